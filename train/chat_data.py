"""Supervised fine-tuning data: chat and instruction rows as token ids with a response mask.

Rows follow the formats TRL users have (https://huggingface.co/docs/trl/dataset_formats):

- `{"messages": [{"role", "content"}, ...]}`: a chat, rendered by the model's chat template;
  the loss is on every assistant turn (its text and the end-of-turn token that closes it),
  never on system or user turns.
- `{"prompt", "completion"}`: plain text (the completion and an EOS are trained on), or
  conversational (both lists of messages; the completion's assistant turns are trained on).
- `{"text"}`: plain language modeling on every token (then EOS).

Rendering goes through `infer.prompts.render_chat`, the one chat renderer: the model's own
template, or, for a model without one (lmjax's own pretrained runs), the documented plain
format `"User: ...\\nAssistant: ..."` with an EOS id after each assistant turn. The response
spans are found by rendering the chat up to each assistant turn with the generation prompt on
(the prefix the model sees at inference) and checking that the whole rendering starts with it;
a template that rewrites earlier turns is refused. Each span runs to the end of the template's
EOS string (e.g. SmolLM2's `<|im_end|>`) when the template writes one, else an EOS id is added.
Text pieces are tokenized separately and concatenated, so a mask boundary never falls inside
a token.

An example longer than `seq_len + 1` tokens is cut at its end (the prompt stays); one with no
response token left is dropped. Both are counted (`EncodeStats`) and reported by the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infer import prompts as prompts_lib
from train import jsonl

EMBEDDED = {"chat": "the embedded English chat set (chatterbot-corpus, train.chat_corpus)"}
FORMATS = ('{"messages": [...]}', '{"prompt", "completion"}', '{"text"}')


class DataError(ValueError):
  """A row that cannot be trained on; the message names the file and the row."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a source and where it came from (for error messages)."""

  data: Mapping[str, Any]
  where: str


# --- sources ------------------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> list[Row]:
  return [Row(data, where) for where, data in jsonl.read_objects(path, DataError)]


def _tfds_rows(name: str, split: str, data_dir: str | None) -> list[Row]:
  import tensorflow_datasets as tfds

  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # tfds raises many kinds; say which dataset and how to prepare it.
    where = data_dir or "the default tfds data dir"
    raise DataError(f"tfds:{name} split {split!r} is not available in {where} ({e}); "
                    f"prepare it with `tfds build {name}`") from e

  def plain(x):
    if isinstance(x, bytes):
      return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.dtype == object:
      return [plain(v) for v in x.tolist()]
    if isinstance(x, Mapping):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
      return [plain(v) for v in x]
    return x

  rows = [Row(plain(source[i]), f"tfds:{name}[{split}][{i}]") for i in range(len(source))]
  if not rows:
    raise DataError(f"tfds:{name} split {split!r} holds no rows")
  return rows


def load_rows(source: str, split: str, *, data_dir: str | None = None,
              heldout_fraction: float = 0.05, seed: int = 0) -> list[Row]:
  """The rows of `split` ("train" or "heldout") of a source.

  Args:
    source: `chat` (the embedded chat set), `jsonl:PATH` (a file of rows, `.gz` allowed; its
      held-out split is `heldout_fraction` of the rows chosen by a hash of (seed, row)), or
      `tfds:NAME` (splits "train" and "test"/"validation" of a prepared tfds dataset).
    split: "train" or "heldout".
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  kind, _, rest = source.partition(":")
  if source in EMBEDDED:
    from train import chat_corpus

    rows = _jsonl_rows(chat_corpus.path())
    return [r for r in rows if r.data.get("split") == split]
  if kind == "jsonl" and rest:
    rows = _jsonl_rows(Path(rest).expanduser())
    held = [_in_heldout(r, heldout_fraction, seed) for r in rows]
    return [r for r, h in zip(rows, held) if h == (split == "heldout")]
  if kind == "tfds" and rest:
    if split == "train":
      return _tfds_rows(rest, "train", data_dir)
    for name in ("validation", "test"):
      try:
        return _tfds_rows(rest, name, data_dir)
      except DataError:
        continue
    raise DataError(f"tfds:{rest} has neither a 'validation' nor a 'test' split")
  raise ValueError(f"unknown SFT data source {source!r}: use 'chat' (embedded), "
                   "'jsonl:PATH' or 'tfds:NAME'")


def _in_heldout(row: Row, fraction: float, seed: int) -> bool:
  blob = json.dumps([seed, row.data], sort_keys=True, default=str).encode()
  return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") < fraction * 2**64


# --- rows to segments ---------------------------------------------------------------------------


def _messages(value: Any, where: str, field: str) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: {field!r} must be a non-empty list of messages")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
        or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: {field}[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
    if m["role"] not in prompts_lib.ROLES:
      raise DataError(f"{where}: {field}[{i}] has role {m['role']!r}; allowed roles: "
                      f"{prompts_lib.ROLES}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _text(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str):
    raise DataError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
  return value


def to_example(row: Row) -> tuple[str, Any]:
  """A row as `("chat", (messages, trained_from))`, `("pair", (prompt, completion))` or
  `("text", text)`; checks it before any work (`trained_from`: the first message index whose
  assistant turns count)."""
  d, where = row.data, row.where
  if "messages" in d:
    msgs = _messages(d["messages"], where, "messages")
    _check_responses(msgs, 0, where, "messages")
    return "chat", (msgs, 0)
  if "prompt" in d and "completion" in d:
    p, c = d["prompt"], d["completion"]
    if isinstance(p, list) or isinstance(c, list):
      prompt = _messages(p, where, "prompt")
      completion = _messages(c, where, "completion")
      _check_responses(completion, 0, where, "completion")
      return "chat", (prompt + completion, len(prompt))
    p, c = _text(p, where, "prompt"), _text(c, where, "completion")
    if not c.strip():
      raise DataError(f"{where}: the completion is empty")
    return "pair", (p, c)
  if "text" in d:
    t = _text(d["text"], where, "text")
    if not t.strip():
      raise DataError(f"{where}: 'text' is empty")
    return "text", t
  raise DataError(f"{where}: a row needs one of the formats {', '.join(FORMATS)}; "
                  f"this row has keys {sorted(d)}")


def _check_responses(msgs: list[dict], start: int, where: str, field: str) -> None:
  answers = [m for m in msgs[start:] if m["role"] == "assistant"]
  if not answers:
    raise DataError(f"{where}: {field!r} has no assistant turn to train on")
  for i, m in enumerate(msgs[start:], start):
    if m["role"] == "assistant" and not m["content"].strip():
      raise DataError(f"{where}: assistant turn {i} is empty")


def chat_segments(messages: list[dict], tokenizer: Any, trained_from: int = 0,
                  chat_template: str | None = None) -> list[tuple[str, bool]]:
  """The rendered chat as `(text, trained)` pieces whose concatenation is the full rendering.

  Each assistant turn at index >= `trained_from` is one trained piece, from the end of the
  generation prompt before it to the end of the template's EOS string after it (or the end of
  the turn's rendering when the template writes no EOS string; `encode_example` then adds an
  EOS id).
  """
  def render(msgs, gen):
    return prompts_lib.render_chat(msgs, tokenizer, chat_template=chat_template,
                                   add_generation_prompt=gen)

  full = render(messages, False)
  eos = getattr(tokenizer, "eos_token", None)
  pieces, pos = [], 0
  for i, m in enumerate(messages):
    if m["role"] != "assistant" or i < trained_from:
      continue
    prefix = render(messages[:i], True) if i else ""
    upto = render(messages[: i + 1], False)
    if not full.startswith(prefix) or not full.startswith(upto) or len(prefix) < pos:
      raise DataError("the chat template does not render a conversation as the sequence of "
                      "its prefixes (it rewrites earlier turns), so the response tokens cannot "
                      "be located; give a chat_template that does")
    end = len(upto)
    if eos and (k := full.find(eos, len(prefix))) != -1 and k < end:
      end = k + len(eos)
    pieces += [(full[pos:len(prefix)], False), (full[len(prefix):end], True)]
    pos = end
  pieces.append((full[pos:], False))
  return [(t, trained) for t, trained in pieces if t]


@dataclasses.dataclass
class EncodeStats:
  """What encoding did to the rows (reported by the job)."""

  examples: int = 0
  tokens: int = 0
  response_tokens: int = 0
  truncated: int = 0
  dropped: int = 0

  def describe(self) -> str:
    return (f"{self.examples:,} examples, {self.tokens:,} tokens ({self.response_tokens:,} "
            f"trained); {self.truncated:,} cut at seq_len, {self.dropped:,} dropped with no "
            "response token left")


def _wants_bos(tokenizer: Any) -> bool:
  # The rule `infer.generate` uses: a tokenizer with its own convention applies it in `encode`.
  return bool(getattr(tokenizer, "add_bos_token", True))


def encode_example(example: tuple[str, Any], tokenizer: Any, seq_len: int,
                   chat_template: str | None = None, stats: EncodeStats | None = None
                   ) -> dict[str, np.ndarray] | None:
  """One example as next-token pairs `inputs`, `targets`, `loss_mask` (`[<= seq_len]`).

  `loss_mask[t]` is 1 where `targets[t]` is a trained token. Returns None (counted in `stats`)
  when truncation left no trained token.
  """
  kind, value = example
  eos_id = tokenizer.eos_id
  if eos_id is None:
    raise ValueError("SFT needs a tokenizer with an EOS token (the model must learn to stop)")
  if kind == "text":
    pieces, eos_after = [(value, True)], True
  elif kind == "pair":
    pieces, eos_after = [(value[0], False), (value[1], True)], True
  else:
    msgs, start = value
    pieces = chat_segments(msgs, tokenizer, start, chat_template)
    eos_after = False
  ids: list[int] = []
  mask: list[int] = []
  texts = [t for t, _ in pieces]
  encoded = tokenizer.encode(texts, add_bos=False, add_eos=False) if texts else []
  eos_text = getattr(tokenizer, "eos_token", None)
  for (text, trained), piece in zip(pieces, encoded):
    piece = [int(i) for i in piece]
    ids += piece
    mask += [int(trained)] * len(piece)
    closes = kind == "chat" and trained and not (eos_text and text.endswith(eos_text))
    if (closes or (eos_after and trained)) and (not piece or piece[-1] != eos_id):
      ids.append(eos_id)
      mask.append(1)
  if _wants_bos(tokenizer) and tokenizer.bos_id is not None and (not ids or ids[0] !=
                                                                 tokenizer.bos_id):
    ids, mask = [tokenizer.bos_id, *ids], [0, *mask]
  stats = stats if stats is not None else EncodeStats()
  if len(ids) > seq_len + 1:
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    stats.truncated += 1
  seq, m = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
  if len(seq) < 2 or not m[1:].any():
    stats.dropped += 1
    return None
  stats.examples += 1
  stats.tokens += len(seq) - 1
  stats.response_tokens += int(m[1:].sum())
  return {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": m[1:]}


def encode_rows(rows: Iterable[Row], tokenizer: Any, seq_len: int, *,
                chat_template: str | None = None) -> tuple[list[dict], EncodeStats]:
  """Checks every row (a `DataError` names the first bad one), then encodes them all."""
  rows = list(rows)
  examples = [to_example(r) for r in rows]
  stats = EncodeStats()
  out = []
  for row, ex in zip(rows, examples):
    try:
      enc = encode_example(ex, tokenizer, seq_len, chat_template, stats)
    except DataError as e:
      raise DataError(f"{row.where}: {e}") from e
    if enc is not None:
      out.append(enc)
  return out, stats


def pad_examples(examples: Sequence[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """Unpacked rows, one example each (tests and small evaluations): `[N, seq_len]` keys of
  `train.packing.finalize_lm`."""
  n = len(examples)
  out = {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
         "loss_mask": np.zeros((n, seq_len), np.float32),
         "segment_ids": np.zeros((n, seq_len), np.int32),
         "positions": np.zeros((n, seq_len), np.int32)}
  for i, ex in enumerate(examples):
    k = len(ex["inputs"])
    for key in ("inputs", "targets", "loss_mask"):
      out[key][i, :k] = ex[key]
    out["segment_ids"][i, :k] = 1
    out["positions"][i, :k] = np.arange(k)
  return out
