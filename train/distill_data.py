"""Data distillation: a teacher writes a synthetic SFT dataset (sequence-level KD, Kim & Rush,
2016, "Sequence-Level Knowledge Distillation").

Prompts come from a source (`chat`: the first user turn of each conversation of the embedded
chat set's train split, `train.chat_corpus`; `arithmetic`: word problems of `train.arithmetic`),
the teacher answers them with `infer.generate` (batched, sampled, one seed per prompt derived
from the prompt's id, so a row does not depend on its batch), and each answer is appended as a
conversational `{"prompt": [...], "completion": [...]}` row (TRL's SFT format, read by
`train.chat_data`) to a jsonl file. Beside it, `FILE.json` records the generation settings
(teacher, sampler, lengths, seed, prompt source). Generation is resumable: rows are appended
and flushed batch by batch, a rerun skips the ids already written (a torn last line is cut
off), and a rerun with other settings is refused rather than mixing two datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train import arithmetic, chat_data
from train.overrides import check_types

PROMPT_SOURCES = ("chat", "arithmetic")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """How the teacher writes the synthetic set (`data.source=synthetic`).

  Attributes:
    prompts: `+`-joined prompt sources of `PROMPT_SOURCES`, e.g. `chat+arithmetic`.
    num_prompts: prompts per source (0: all of `chat`; `arithmetic` needs a count).
    max_new_tokens: longest answer.
    temperature, top_p: the teacher's sampler (nucleus sampling, Holtzman et al., 2020).
    batch_size: prompts per `infer.generate` call (and per flush to the file).
    seed: the sampling seed (each prompt's seed is derived from it and the prompt's id) and
      the arithmetic problems' seed.
    store_topk: K > 0 also stores the teacher's top-K log-probs of every trained token of the
      data beside it (`train.distill_topk`), for `kd.teacher=stored`.
  """

  prompts: str = "chat"
  num_prompts: int = 0
  max_new_tokens: int = 64
  temperature: float = 0.8
  top_p: float = 0.95
  batch_size: int = 32
  seed: int = 0
  store_topk: int = 0

  def __post_init__(self):
    check_types(self)
    if self.store_topk < 0:
      raise ValueError(f"generate.store_topk={self.store_topk} must be >= 0 (0: store none)")
    bad = [s for s in self.prompts.split("+") if s not in PROMPT_SOURCES]
    if bad or not self.prompts:
      raise ValueError(f"generate.prompts={self.prompts!r}: join sources of {PROMPT_SOURCES} "
                       "with '+'")
    if "arithmetic" in self.prompts.split("+") and self.num_prompts < 1:
      raise ValueError("generate.num_prompts must be >= 1 for arithmetic prompts (0 means all, "
                       "which only the chat set has)")
    if self.num_prompts < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
      raise ValueError("generate: num_prompts >= 0, max_new_tokens >= 1 and batch_size >= 1")
    if self.temperature <= 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"generate: temperature={self.temperature} must be > 0 and top_p="
                       f"{self.top_p} in (0, 1]")


def prompt_rows(gc: GenerateConfig) -> list[dict[str, Any]]:
  """`{"id", "prompt": [messages]}` rows (plus `answer` for arithmetic), in a fixed order."""
  rows = []
  for source in gc.prompts.split("+"):
    if source == "chat":
      convs = chat_data.load_rows("chat", "train")
      if gc.num_prompts:
        convs = convs[:gc.num_prompts]
      for i, r in enumerate(convs):
        msgs = r.data["messages"]
        first = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        rows.append({"id": f"chat:{i}", "prompt": [dict(m) for m in msgs[:first]]})
    else:
      for i, p in enumerate(arithmetic.problems(gc.num_prompts, gc.seed, "train")):
        rows.append({"id": f"arithmetic:{i}", "answer": p["answer"],
                     "prompt": [{"role": "user", "content": p["prompt"]}]})
  return rows


def _row_seed(seed: int, row_id: str) -> int:
  digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
  return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _done_ids(path: Path) -> set[str]:
  """Ids already in the file; a torn last line (a crash mid-write) is cut off."""
  if not path.exists():
    return set()
  data = path.read_bytes()
  good = data.rfind(b"\n") + 1
  if good < len(data):
    with open(path, "r+b") as f:
      f.truncate(good)
  return {json.loads(line)["id"] for line in data[:good].decode("utf-8").splitlines()
          if line.strip()}


def settings_of(gc: GenerateConfig, teacher: str) -> dict[str, Any]:
  gen = {k: v for k, v in dataclasses.asdict(gc).items() if k != "store_topk"}  # Not the rows'.
  return {"teacher": teacher, **gen, "format": "prompt/completion (chat)"}


def generate_dataset(path: str | os.PathLike, gc: GenerateConfig, teacher: str,
                     load_teacher: Callable[[], tuple[Any, Any, Any]], *, log=print) -> dict:
  """Writes (or completes) the teacher's synthetic set at `path`.

  Args:
    path: the jsonl file; `path + ".json"` holds the settings.
    gc: the generation settings.
    teacher: the teacher's name (recorded, and compared on resume).
    load_teacher: `() -> (model, params, tokenizer)`, called only when rows are missing.

  Returns:
    `{"rows", "generated", "skipped_empty", "settings"}`.
  """
  import infer
  from infer import prompts as prompts_lib

  path = Path(path)
  meta_path = path.with_name(path.name + ".json")
  settings = settings_of(gc, teacher)
  if meta_path.exists():
    old = json.loads(meta_path.read_text())
    if old != settings:
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      raise ValueError(f"{path} was generated with other settings ({', '.join(diff)} differ: "
                       f"{ {k: old.get(k) for k in diff} }); use another --workdir or delete it")
  path.parent.mkdir(parents=True, exist_ok=True)
  meta_path.write_text(json.dumps(settings, indent=2))
  rows = prompt_rows(gc)
  done = _done_ids(path)
  todo = [r for r in rows if r["id"] not in done]
  out = {"rows": len(done), "generated": 0, "skipped_empty": 0, "settings": settings}
  if not todo:
    return out
  model, params, tok = load_teacher()
  sampler = infer.sampling.TopP(p=gc.top_p, temperature=gc.temperature)
  log(f"teacher {teacher}: generating {len(todo)} of {len(rows)} synthetic rows into {path}")
  with open(path, "a", encoding="utf-8") as f:
    for start in range(0, len(todo), gc.batch_size):
      batch = todo[start:start + gc.batch_size]
      texts = [prompts_lib.render_chat(r["prompt"], tok) for r in batch]
      res = infer.generate(model, params, texts, tokenizer=tok, max_new_tokens=gc.max_new_tokens,
                           sampler=sampler, seed=[_row_seed(gc.seed, r["id"]) for r in batch])
      for r, text, reason in zip(batch, res.text, res.stop_reason):
        if not text.strip():  # An empty answer cannot be trained on.
          out["skipped_empty"] += 1
          continue
        f.write(json.dumps({**r, "completion": [{"role": "assistant", "content": text.strip()}],
                            "stop_reason": reason}) + "\n")
        out["generated"] += 1
      f.flush()
      log(f"  {min(start + gc.batch_size, len(todo))}/{len(todo)}")
  out["rows"] = len(_done_ids(path))
  return out
