"""Tokenizers of pretrained models through Hugging Face `tokenizers`.

`HFTokenizer` implements `lmjax.tokenizer.Tokenizer` (encode, decode, `pad_id`, `bos_id`,
`eos_id`, `unk_id`, `vocab_size`) plus `bos_token`, `eos_token`, `chat_template` and
`apply_chat_template`. It is built from

* a `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) of a Hugging Face folder;
* the `tokenizer.ggml.*` metadata of a GGUF file, following llama.cpp's `llama-vocab.cpp`:
  - `gpt2`: byte-level BPE (Radford et al., 2019) with the file's merges, and the
    pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre` (`smollm` and `starcoder`
    split every digit first, as SmolLM2's own `tokenizer.json` does with `Digits`);
  - `llama`: sentencepiece-style BPE with byte fallback (`<0x00>`..`<0xFF>`), its merges
    recovered from the token scores (a piece's score orders its merge), "▁" for spaces.
  Control tokens (type 3) become special added tokens (matched whole in text, dropped by
  `decode`), user-defined ones (type 4) plain added tokens.

Chat templates are rendered by `lmjax.convert.chat_template` (the one renderer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.convert.chat_template import render_chat_template, special_tokens_map
from lmjax.tokenizer import _is_batch

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of llama.cpp's `llama-vocab.cpp` (`tokenizer.ggml.pre` -> regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = ("default", "gpt-2", "gpt2", "olmo", "mpt")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell")
_SPLIT_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT}
SUPPORTED_PRE = (*_GPT2_PRE, *_DIGITS_PRE, *_SPLIT_PRE)
SUPPORTED_MODELS = ("gpt2", "llama")


def _tokenizers():
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("pretrained tokenizers need the `tokenizers` package: "
                      "pip install tokenizers") from e
  return tokenizers


def _token_str(t: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(t, dict):
    return t.get("content")
  return t


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind lmjax's `Tokenizer` interface, with a chat template.

  Build with `from_gguf_metadata` or `from_folder`; `save` writes a folder transformers loads.
  Picklable (for data workers).
  """

  def __init__(self, tokenizer, *, bos_token: str | None, eos_token: str | None,
               unk_token: str | None = None, pad_token: str | None = None,
               chat_template: str | None = None, add_bos_token: bool = False,
               add_eos_token: bool = False, model_max_length: int | None = None):
    """Args:
      tokenizer: a `tokenizers.Tokenizer` (its post-processor is not used: `encode` adds
        bos/eos itself).
      bos_token, eos_token, unk_token, pad_token: the special tokens' strings (None: absent).
      chat_template: the Jinja2 chat template, or None.
      add_bos_token, add_eos_token: the model's own convention, used when `encode` is not told.
      model_max_length: the context length, written to tokenizer_config.json.
    """
    self._tk = tokenizer
    self._tokens = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
    for k, tok in self._tokens.items():
      if tok is not None and tokenizer.token_to_id(tok) is None:
        raise ValueError(f"{k}_token {tok!r} is not in the vocabulary")
    self.chat_template = chat_template
    self.add_bos_token = bool(add_bos_token)
    self.add_eos_token = bool(add_eos_token)
    self.model_max_length = model_max_length

  def _id(self, k: str) -> int | None:
    tok = self._tokens[k]
    return None if tok is None else self._tk.token_to_id(tok)

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  bos_token = property(lambda self: self._tokens["bos"])
  eos_token = property(lambda self: self._tokens["eos"])
  unk_token = property(lambda self: self._tokens["unk"])
  pad_token = property(lambda self: self._tokens["pad"])
  mask_id = property(lambda self: None)
  sentinel_ids = property(lambda self: ())
  backend = property(lambda self: self._tk, doc="the `tokenizers.Tokenizer`")

  @property
  def bos_id(self) -> int | None:
    return self._id("bos")

  @property
  def eos_id(self) -> int | None:
    return self._id("eos")

  @property
  def unk_id(self) -> int | None:
    return self._id("unk")

  @property
  def pad_id(self) -> int:
    """The pad token's id; the eos id when the model has no pad token (as is common), else 0."""
    for k in ("pad", "eos"):
      if (i := self._id(k)) is not None:
        return i
    return 0

  def encode(self, text: str | Sequence[str], *, add_bos: bool | None = None,
             add_eos: bool | None = None) -> list[int] | list[list[int]]:
    """Text to ids; special tokens written in the text (`<|im_start|>`) become their ids.

    Args:
      text: one string or a list of strings.
      add_bos, add_eos: put `bos_id` first / `eos_id` last; None: the model's convention
        (`add_bos_token` / `add_eos_token`, e.g. True for Llama 2, False for SmolLM2).

    Returns:
      `list[int]` for one string, `list[list[int]]` for a list.
    """
    bos = self.add_bos_token if add_bos is None else add_bos
    eos = self.add_eos_token if add_eos is None else add_eos
    def wrap(ids):
      if bos:
        if self.bos_id is None:
          raise ValueError("add_bos=True but this tokenizer has no bos token")
        ids = [self.bos_id, *ids]
      if eos:
        if self.eos_id is None:
          raise ValueError("add_eos=True but this tokenizer has no eos token")
        ids = [*ids, self.eos_id]
      return ids
    if isinstance(text, str):
      return wrap(self._tk.encode(text, add_special_tokens=False).ids)
    encs = self._tk.encode_batch(list(text), add_special_tokens=False)
    return [wrap(e.ids) for e in encs]

  def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str | list[str]:
    """Ids to text; special tokens (bos, eos, pad, chat markers) dropped unless asked.

    Args:
      ids: `[T]` (list or array) for one text, or `[B, T]` / a list of lists for a batch.
    """
    if _is_batch(ids):
      return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
    flat = np.asarray(ids, np.int64).reshape(-1).tolist()
    return self._tk.decode(flat, skip_special_tokens=skip_special_tokens)

  def id_to_piece(self, i: int) -> str | None:
    return self._tk.id_to_token(int(i))

  def piece_to_id(self, piece: str) -> int | None:
    return self._tk.token_to_id(piece)

  def token_bytes(self) -> list[bytes]:
    """Per id, the UTF-8 bytes it adds to decoded text (`lmjax.tokenizer.Tokenizer`): b"" for
    special tokens (`decode` drops them); with a `ByteLevel` decoder (GPT-2 style BPE) the bytes
    behind GPT-2's byte-to-unicode alphabet, so a token may be part of a character; otherwise
    `<0xAB>` byte-fallback pieces as their byte and the decoder's `Replace` / `Metaspace` rules
    ("▁" -> " ") on the token's text. A decoder that strips the text's first space (llama's)
    does so in `decode`; these bytes keep it. Computed once, then cached."""
    cached = getattr(self, "_token_bytes_cache", None)
    if cached is not None and len(cached) == self.vocab_size:
      return list(cached)
    spec = {} if self._tk.decoder is None else json.loads(self._tk.decoder.__getstate__())
    parts = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    kinds = {p.get("type") for p in parts}
    replace = [(p["pattern"]["String"], p["content"]) for p in parts
               if p.get("type") == "Replace" and "String" in (p.get("pattern") or {})]
    replace += [(p.get("replacement", "\u2581"), " ") for p in parts
                if p.get("type") == "Metaspace"]
    # GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the rest 256+.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    specials = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
    out = []
    for i in range(self.vocab_size):
      tok = self._tk.id_to_token(i)
      if tok is None or i in specials:
        out.append(b"")
      elif "ByteLevel" in kinds:
        if all(c in to_byte for c in tok):
          out.append(bytes(to_byte[c] for c in tok))
        else:  # as the decoder does: a token outside the alphabet is its own text
          out.append(tok.encode("utf-8"))
      elif ("ByteFallback" in kinds and len(tok) == 6 and tok.startswith("<0x")
            and tok.endswith(">") and all(c in "0123456789abcdefABCDEF" for c in tok[3:5])):
        out.append(bytes([int(tok[3:5], 16)]))
      else:
        for old, new in replace:
          tok = tok.replace(old, new)
        out.append(tok.encode("utf-8"))
    self._token_bytes_cache = out
    return list(out)

  def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                          add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text of a chat, rendered with the model's Jinja2 template.

    Encode the result with `add_bos=False` (templates write their own bos), or use
    `encode_chat`.

    Args:
      messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`.
      add_generation_prompt: end with the header of an assistant turn.
      **kwargs: extra template variables (e.g. `tools`, `documents`); they override the
        special tokens.

    Raises:
      ValueError: the tokenizer has no chat template, or the template fails (see
        `render_chat_template`).
    """
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (base models usually have none); "
                       "build the prompt text yourself")
    return render_chat_template(self.chat_template, messages,
                                add_generation_prompt=add_generation_prompt,
                                **{**special_tokens_map(self), **kwargs})

  def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                  **kwargs) -> list[int]:
    """`encode(apply_chat_template(messages, ...), add_bos=False, add_eos=False)`."""
    text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
    return self.encode(text, add_bos=False, add_eos=False)

  # --- construction and saving -----------------------------------------------------------

  @classmethod
  def from_gguf_metadata(cls, meta: dict[str, Any], where: str = "GGUF") -> HFTokenizer:
    """From a GGUF file's `tokenizer.*` metadata (keys without the `tokenizer.` prefix).

    Raises:
      ValueError: a tokenizer model or pre-tokenizer other than the supported ones.
    """
    model = meta.get("ggml.model")
    tokens = meta.get("ggml.tokens")
    if model not in SUPPORTED_MODELS or tokens is None:
      raise ValueError(f"{where} has tokenizer model {model!r}"
                       f"{'' if tokens is not None else ' and no token list'}; supported GGUF "
                       f"tokenizers: {list(SUPPORTED_MODELS)} (byte-level BPE, sentencepiece BPE)")
    types = list(meta.get("ggml.token_type") or [NORMAL] * len(tokens))
    if model == "gpt2":
      tk = _byte_level_bpe(tokens, meta.get("ggml.merges") or [], meta.get("ggml.pre"), where)
    else:
      tk = _sentencepiece_bpe(tokens, meta.get("ggml.scores"), types, meta.get("ggml.merges"),
                              meta.get("ggml.add_space_prefix", True), meta.get(
                                  "ggml.unknown_token_id"))
    _add_special(tk, tokens, types)
    def tok(key):
      i = meta.get(f"ggml.{key}_token_id")
      return tokens[i] if i is not None and 0 <= i < len(tokens) else None
    return cls(tk, bos_token=tok("bos"), eos_token=tok("eos"), unk_token=tok("unknown"),
               pad_token=tok("padding"), chat_template=meta.get("chat_template"),
               add_bos_token=meta.get("ggml.add_bos_token", model == "llama"),
               add_eos_token=meta.get("ggml.add_eos_token", False))

  @classmethod
  def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
    """From a Hugging Face folder's `tokenizer.json`, `tokenizer_config.json` (special tokens,
    `chat_template`, `add_bos_token`), `chat_template.jinja` and `special_tokens_map.json`."""
    tokenizers = _tokenizers()
    folder = Path(folder)
    tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    conf: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      if (folder / name).is_file():
        conf.update(json.loads((folder / name).read_text(encoding="utf-8")))
    template = conf.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), None))
    if (folder / "chat_template.jinja").is_file():
      template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    add_bos = conf.get("add_bos_token")
    if add_bos is None:  # read the template post-processor: does it put bos first?
      add_bos = _post_processor_adds_bos(tk, _token_str(conf.get("bos_token")))
    max_len = conf.get("model_max_length")
    return cls(tk, bos_token=_token_str(conf.get("bos_token")),
               eos_token=_token_str(conf.get("eos_token")),
               unk_token=_token_str(conf.get("unk_token")),
               pad_token=_token_str(conf.get("pad_token")), chat_template=template,
               add_bos_token=add_bos, add_eos_token=bool(conf.get("add_eos_token", False)),
               model_max_length=max_len if isinstance(max_len, int) and max_len < 1e12 else None)

  def save(self, folder: str | os.PathLike) -> list[Path]:
    """Writes `tokenizer.json`, `tokenizer_config.json` (with `chat_template`) and
    `special_tokens_map.json` into `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "tokenizer.json", folder / "tokenizer_config.json",
             folder / "special_tokens_map.json"]
    self._tk.save(str(paths[0]))
    specials = {f"{k}_token": v for k, v in self._tokens.items() if v is not None}
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False}
    if self.model_max_length is not None:
      conf["model_max_length"] = self.model_max_length
    if self.chat_template is not None:
      conf["chat_template"] = self.chat_template
    paths[1].write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    return paths

  def _state(self) -> dict:
    return {"json": self._tk.to_str(), "tokens": dict(self._tokens),
            "chat_template": self.chat_template, "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token, "model_max_length": self.model_max_length}

  def __getstate__(self):
    return self._state()

  def __setstate__(self, s):
    tk = _tokenizers().Tokenizer.from_str(s["json"])
    t = s["tokens"]
    self.__init__(tk, bos_token=t["bos"], eos_token=t["eos"], unk_token=t["unk"],
                  pad_token=t["pad"], chat_template=s["chat_template"],
                  add_bos_token=s["add_bos_token"], add_eos_token=s["add_eos_token"],
                  model_max_length=s["model_max_length"])

  def __repr__(self) -> str:
    return (f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, chat_template={self.chat_template is not None})")


def _post_processor_adds_bos(tk, bos: str | None) -> bool:
  if bos is None or tk.post_processor is None:
    return False
  try:
    desc = json.loads(tk.post_processor.__getstate__())
  except Exception:  # noqa: BLE001 - an opaque post-processor: assume no bos
    return False
  single = desc.get("single") or []
  first = single[0] if single else {}
  return first.get("SpecialToken", {}).get("id") == bos


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None, where: str):
  """GPT-2 style byte-level BPE (tokens already in GPT-2's byte-to-unicode alphabet)."""
  tokenizers = _tokenizers()
  from tokenizers import Regex, decoders, models, pre_tokenizers
  pre = pre or "default"
  if pre not in SUPPORTED_PRE:
    raise ValueError(f"{where} has pre-tokenizer {pre!r}; supported: {list(SUPPORTED_PRE)}")
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in ("llama3", "llama-v3",
                                                                     "llama-bpe"))
  tk = tokenizers.Tokenizer(bpe)
  if pre in _SPLIT_PRE:
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre in _DIGITS_PRE:
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tk.decoder = decoders.ByteLevel()
  return tk


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float],
                         types: Sequence[int]) -> list[tuple[str, str]]:
  """BPE merges implied by a sentencepiece vocabulary: every split of a normal piece into two
  pieces of the vocabulary, the piece with the higher score merged first (sentencepiece's
  `bpe_model.cc` merges the pair whose union scores highest)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  out = []
  for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
    if typ != NORMAL or len(piece) < 2:
      continue
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in vocab and right in vocab:
        out.append((-float(score), i, vocab[left], vocab[right], left, right))
  out.sort()
  return [(left, right) for *_, left, right in out]


def _sentencepiece_bpe(tokens, scores, types, merges, add_space_prefix, unk_id):
  """Sentencepiece-style BPE: "▁" for spaces, byte fallback, merges from scores."""
  tokenizers = _tokenizers()
  from tokenizers import decoders, models, normalizers
  if merges:
    pairs = [tuple(m.split(" ", 1)) for m in merges]
  else:
    if scores is None:
      raise ValueError("a sentencepiece GGUF vocabulary needs tokenizer.ggml.scores or merges")
    pairs = sentencepiece_merges(tokens, scores, types)
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
  bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                   byte_fallback=any(t == BYTE for t in types))
  tk = tokenizers.Tokenizer(bpe)
  # llama.cpp prefixes a space to every text fragment that starts the text or follows a
  # special token; the normalizer runs per fragment between added tokens, so it does the same.
  tk.normalizer = normalizers.Sequence(
      [*([normalizers.Prepend("\u2581")] if add_space_prefix else []),
       normalizers.Replace(" ", "\u2581")])
  tk.decoder = decoders.Sequence([
      decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
      *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
  return tk


def _add_special(tk, tokens: Sequence[str], types: Sequence[int]) -> None:
  from tokenizers import AddedToken
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if ty == CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, types) if ty == USER_DEFINED]
  if special:
    tk.add_special_tokens(special)
  if user:
    tk.add_tokens(user)
