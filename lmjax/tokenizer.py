"""Tokenizers: a small interface, and a SentencePiece implementation that trains, caches and loads.

SentencePiece (Kudo & Richardson, 2018, https://arxiv.org/abs/1808.06226) learns a BPE
(Sennrich et al., 2016) or unigram-LM (Kudo, 2018) vocabulary directly from raw text.

Text normalization is done here in Python, not by SentencePiece (whose normalizer is set to
`identity`), so the same function runs on the training sentences and on every `encode` call.
Rules, applied in this order when enabled (see `NormalizationConfig`):

1. `nfkc`: Unicode NFKC (compatibility forms fold: "ﬁ" -> "fi", "Ａ" -> "A", "①" -> "1").
2. `strip_accents`: decompose (NFD), drop combining marks, recompose (NFC): "café" -> "cafe".
3. `lowercase`: `str.lower`.
4. `fold_whitespace`: "\\r\\n" and "\\r" become "\\n"; each run of other whitespace becomes one
   space; spaces next to a newline are dropped; three or more newlines become two. Training
   text is also stripped at both ends; `encode` keeps the ends (folded by the same rules), so
   a prompt's trailing newline survives: "ROMEO:\\n" encodes to tokens that decode to
   "ROMEO:\\n".

Special tokens of a tokenizer trained here have fixed ids:

  ======  ========================  ==========================================
  id      piece                     attribute
  ======  ========================  ==========================================
  0       ``<pad>``                 `pad_id`
  1       ``<s>``                   `bos_id`
  2       ``</s>``                  `eos_id`
  3       ``<unk>``                 `unk_id`
  4       ``<mask>``                `mask_id` (masked LM)
  5+i     ``<extra_id_i>``          `sentinel_ids[i]`, i < num_sentinels (T5 span corruption)
  ======  ========================  ==========================================

followed by a newline piece, the 256 byte-fallback pieces ``<0x00>``..``<0xFF>`` (so any text
round-trips without `<unk>`), then the learned pieces. `<mask>` and the sentinels are
user-defined pieces: they appear in decoded text, and the literal strings encode to them.

A trained tokenizer is cached under a key made from its corpus and its settings, in
`~/.cache/lmjax/tokenizers` (override with the `cache_dir` argument or `$LMJAX_TOKENIZER_CACHE`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
FIRST_SENTINEL_ID = 5
MASK_PIECE = "<mask>"
NEWLINE_PIECE = "\n"
MODEL_TYPES = ("bpe", "unigram")
_CACHE_FORMAT = 1  # Bump when training changes so old cache entries are not reused.


def sentinel_piece(i: int) -> str:
  """The piece of sentinel `i` (T5 naming)."""
  return f"<extra_id_{i}>"


@dataclasses.dataclass(frozen=True)
class NormalizationConfig:
  """Which normalization rules run (module docstring gives the order and exact effect)."""

  nfkc: bool = True
  fold_whitespace: bool = True
  lowercase: bool = False
  strip_accents: bool = False


_HSPACE = re.compile(r"[^\S\n]+")
_SPACE_AT_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str, config: NormalizationConfig, *, keep_ends: bool = False) -> str:
  """Applies the enabled normalization rules to `text` (module docstring lists them).

  Args:
    text: the text.
    config: which rules run.
    keep_ends: do not strip whitespace at the ends (`fold_whitespace` still folds it): what
      `SentencePieceTokenizer.encode` does, so that a user's "ROMEO:\\n" keeps its newline.
      False (training) strips both ends.
  """
  if config.nfkc:
    text = unicodedata.normalize("NFKC", text)
  if config.strip_accents:
    decomposed = unicodedata.normalize("NFD", text)
    text = unicodedata.normalize(
        "NFC", "".join(c for c in decomposed if not unicodedata.combining(c))
    )
  if config.lowercase:
    text = text.lower()
  if config.fold_whitespace:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE.sub(" ", text)
    text = _SPACE_AT_NEWLINE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    if not keep_ends:
      text = text.strip()
  return text


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """How to train a SentencePiece tokenizer.

  Attributes:
    model_type: "bpe" or "unigram".
    vocab_size: total vocabulary, special and byte pieces included. A tiny corpus may yield
      fewer pieces (the limit is soft); `Tokenizer.vocab_size` gives the real size.
    num_sentinels: span-corruption sentinels, ids 5 .. 5 + num_sentinels - 1.
    normalization: the text normalization, used for training and encoding alike.
    input_sentence_size: lines sampled from the corpus for training (0 = all).
    max_corpus_chars: at most this many characters are read from the corpus.
    character_coverage: share of characters the vocabulary must cover (rest: byte fallback).
    seed: seed of SentencePiece's sentence sampling.
  """

  model_type: str = "bpe"
  vocab_size: int = 4096
  num_sentinels: int = 100
  normalization: NormalizationConfig = dataclasses.field(default_factory=NormalizationConfig)
  input_sentence_size: int = 200_000
  max_corpus_chars: int = 50_000_000
  character_coverage: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r}; allowed: {MODEL_TYPES}")
    if self.num_sentinels < 0:
      raise ValueError(f"num_sentinels={self.num_sentinels}; must be >= 0")
    reserved = FIRST_SENTINEL_ID + self.num_sentinels + 1 + 256
    if self.vocab_size <= reserved:
      raise ValueError(
          f"vocab_size={self.vocab_size} leaves no learned pieces: {reserved} ids are reserved "
          f"(5 specials, {self.num_sentinels} sentinels, newline, 256 bytes); use more"
      )
    if not 0.0 < self.character_coverage <= 1.0:
      raise ValueError(f"character_coverage={self.character_coverage}; must be in (0, 1]")
    if self.input_sentence_size < 0 or self.max_corpus_chars <= 0:
      raise ValueError("input_sentence_size must be >= 0 and max_corpus_chars > 0")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and decoders need from a tokenizer.

  A Hugging Face `tokenizers`-backed class implements the same members. `mask_id` is None and
  `sentinel_ids` empty where a vocabulary has no such pieces.
  """

  @property
  def vocab_size(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def bos_id(self) -> int: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def unk_id(self) -> int: ...
  @property
  def mask_id(self) -> int | None: ...
  @property
  def sentinel_ids(self) -> tuple[int, ...]: ...

  def encode(
      self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[int] | list[list[int]]: ...

  def decode(self, ids: Any) -> str | list[str]: ...

  def token_bytes(self) -> list[bytes]:
    """Per id, the UTF-8 bytes it adds to decoded text (b"" for ids `decode` drops).

    Concatenated over a sequence they give its text, also where a token holds part of a
    character (byte-level BPE, byte fallback). `infer` matches stop strings with them.
    """
    ...


def _is_batch(ids: Any) -> bool:
  """Whether `ids` is a batch (`[B, T]` array, jax or numpy, or a list of lists)."""
  if hasattr(ids, "ndim"):
    return np.ndim(ids) == 2
  return len(ids) > 0 and isinstance(ids[0], list | tuple | np.ndarray)


class SentencePieceTokenizer:
  """A `Tokenizer` over a SentencePiece model, with Python-side normalization.

  Build with `train_tokenizer` or `SentencePieceTokenizer.load`. Picklable (for data workers).
  """

  def __init__(self, model_proto: bytes, normalization: NormalizationConfig | None = None):
    """Args: the serialized model; the normalization to apply before encoding (None: none)."""
    self._proto = bytes(model_proto)
    self.normalization = normalization
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    sp = self._sp
    self._mask = self._find_piece(MASK_PIECE)
    sentinels = []
    while (i := self._find_piece(sentinel_piece(len(sentinels)))) is not None:
      sentinels.append(i)
    self._sentinels = tuple(sentinels)
    self._ids = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    self._token_bytes: list[bytes] | None = None

  def _find_piece(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  vocab_size = property(lambda self: self._sp.get_piece_size())
  pad_id = property(lambda self: self._ids[0])
  bos_id = property(lambda self: self._ids[1])
  eos_id = property(lambda self: self._ids[2])
  unk_id = property(lambda self: self._ids[3])
  mask_id = property(lambda self: self._mask)
  sentinel_ids = property(lambda self: self._sentinels)
  model_proto = property(lambda self: self._proto)

  def normalize(self, text: str) -> str:
    """The text as `encode` sees it (the normalization, with the ends kept: see the module
    docstring)."""
    if self.normalization is None:
      return text
    return normalize_text(text, self.normalization, keep_ends=True)

  def encode(
      self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[int] | list[list[int]]:
    """Text to ids.

    Args:
      text: one string, or a list of strings.
      add_bos, add_eos: put `bos_id` first / `eos_id` last.

    Returns:
      `list[int]` for one string, `list[list[int]]` for a list.
    """
    if isinstance(text, str):
      return self._sp.encode(self.normalize(text), add_bos=add_bos, add_eos=add_eos)
    return self._sp.encode([self.normalize(t) for t in text], add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Any) -> str | list[str]:
    """Ids to text; pad, bos and eos are dropped.

    Args:
      ids: `[T]` (list or array) for one text, or `[B, T]` / a list of lists for a batch.

    Returns:
      A string, or a list of B strings.
    """
    if _is_batch(ids):
      return [self._sp.decode(np.asarray(row, np.int64).tolist()) for row in ids]
    return self._sp.decode(np.asarray(ids, np.int64).reshape(-1).tolist())

  def token_bytes(self) -> list[bytes]:
    """Per id, the UTF-8 bytes it adds to decoded text: b"" for control ids (pad, bos, eos),
    the byte of a byte-fallback piece `<0xAB>`, the piece with "▁" as a space otherwise (the
    unknown id: SentencePiece's " ⁇ "). Joined over `encode(text)` they give `text` (as
    `normalize` left it). A model with SentencePiece's dummy prefix drops the leading space of
    its whole text in `decode`; these bytes keep it."""
    if self._token_bytes is None:
      sp, out = self._sp, []
      for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i):
          out.append(b"")
        elif sp.is_byte(i):
          out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_unknown(i):
          out.append(sp.decode([i]).encode("utf-8"))
        else:
          out.append(piece.replace("\u2581", " ").encode("utf-8"))
      self._token_bytes = out
    return list(self._token_bytes)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def save(self, path: str | os.PathLike) -> Path:
    """Writes `path` (the `.model`) and, beside it, `<path>.json` with the normalization."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, self._proto)
    settings = {"normalization": None}
    if self.normalization is not None:
      settings["normalization"] = dataclasses.asdict(self.normalization)
    _atomic_write(_settings_path(path), json.dumps(settings, indent=1).encode())
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    """Loads a `.model` file.

    The normalization comes from `<path>.json` when present (files written by `save`);
    otherwise none is added to the model's own SentencePiece normalizer (external models).
    """
    path = Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"no SentencePiece model file at {str(path)!r}")
    normalization = None
    if _settings_path(path).is_file():
      settings = json.loads(_settings_path(path).read_text())
      if settings.get("normalization") is not None:
        normalization = NormalizationConfig(**settings["normalization"])
    return cls(path.read_bytes(), normalization)

  def __getstate__(self):
    return {"proto": self._proto, "normalization": self.normalization}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["normalization"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, {self.normalization})"


def _settings_path(path: Path) -> Path:
  return path.with_name(path.name + ".json")


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def default_cache_dir() -> Path:
  """`$LMJAX_TOKENIZER_CACHE`, else `~/.cache/lmjax/tokenizers`."""
  env = os.environ.get("LMJAX_TOKENIZER_CACHE")
  return Path(env) if env else Path("~/.cache/lmjax/tokenizers").expanduser()


def _read_corpus(texts: Iterable[str], config: TokenizerConfig) -> tuple[list[str], str]:
  """Normalized non-empty lines of the corpus (up to `max_corpus_chars`), and its sha256."""
  digest = hashlib.sha256()
  lines, chars = [], 0
  for text in texts:
    if chars >= config.max_corpus_chars:
      break
    text = text[: config.max_corpus_chars - chars]
    chars += len(text)
    raw = text.encode("utf-8")
    digest.update(len(raw).to_bytes(8, "little") + raw)
    lines.extend(line for line in normalize_text(text, config.normalization).split("\n") if line)
  return lines, digest.hexdigest()


def cache_key(corpus_sha256: str, config: TokenizerConfig) -> str:
  """The cache key: a hash of the corpus hash, the settings and the SentencePiece version."""
  blob = json.dumps(
      [_CACHE_FORMAT, spm.__version__, corpus_sha256, dataclasses.asdict(config)], sort_keys=True
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def train_tokenizer(
    texts: Iterable[str],
    config: TokenizerConfig = TokenizerConfig(),
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece tokenizer on `texts`, or loads it from the cache.

  Args:
    texts: the corpus, as documents (newlines allowed; each line is a training sentence).
    config: the settings; with the corpus they make the cache key.
    cache_dir: where trained models are kept (default `default_cache_dir()`).
    use_cache: False trains afresh and writes nothing.

  Returns:
    The tokenizer, with the fixed special ids of the module docstring.
  """
  lines, corpus_sha = _read_corpus(texts, config)
  path = None
  if use_cache:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(corpus_sha, config)
    path = cache / f"sp-{config.model_type}-{config.vocab_size}-{key}.model"
    if path.is_file():
      return SentencePieceTokenizer.load(path)
  if not lines:
    raise ValueError("cannot train a tokenizer: the corpus has no non-empty text")
  tokenizer = SentencePieceTokenizer(_train_proto(lines, config), config.normalization)
  expected = (PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID)
  got = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.mask_id)
  sentinels = tuple(range(FIRST_SENTINEL_ID, FIRST_SENTINEL_ID + config.num_sentinels))
  if got != expected or tokenizer.sentinel_ids != sentinels:
    raise RuntimeError(f"special ids came out as {got}, {tokenizer.sentinel_ids}; expected "
                       f"{expected} and sentinels {sentinels[:1]}..{sentinels[-1:]}")
  if path is not None:
    tokenizer.save(path)
  return tokenizer


def _train_proto(lines: list[str], config: TokenizerConfig) -> bytes:
  spm.set_random_generator_seed(config.seed)
  writer = io.BytesIO()
  symbols = [MASK_PIECE] + [sentinel_piece(i) for i in range(config.num_sentinels)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=writer,
      model_type=config.model_type,
      vocab_size=config.vocab_size,
      hard_vocab_limit=False,
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      user_defined_symbols=symbols + [NEWLINE_PIECE],
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      character_coverage=config.character_coverage,
      input_sentence_size=config.input_sentence_size,
      shuffle_input_sentence=True,
      max_sentence_length=1 << 16,
      num_threads=max(1, min(8, os.cpu_count() or 1)),
      minloglevel=2,
  )
  return writer.getvalue()
