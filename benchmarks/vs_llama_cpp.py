"""lmjax against llama.cpp on the same GGUF, the same machine, the same process.

The file is the SmolLM2-135M-Instruct GGUF that `lmjax.load_pretrained("smollm2-135m-instruct")`
reads (Q4_1 / Q8_0 blocks). llama.cpp runs it through `llama-cpp-python` (the `reference`
extra), one token per `decode` (`n_batch=1`: this CPU build crashes on a multi-token batch, and
batch-1 decode is what is timed). lmjax runs float32 (the GGUF dequantized: the agreement
reference), packed float32 / bfloat16 / int8 / int4 / nf4 (`lmjax.packed.pack`), the Q4_1
blocks kept as they are (`load_pretrained(..., quant="keep")`) and those blocks packed
(`packed-q4_1-kept`: the same codes, scales and minimums; the Q8_0 embedding int8 per row).
`packed-int8-a8` / `packed-int4-a8` / `packed-q4_1-kept-a8`: the same weights with int8
activations (`pack(..., activations="int8")`: decoding's products through the kernels of
`lmjax.quant.cpu_int8` / `cpu_int4`, inputs rounded to int8 per group of 32), beside the
weight-only formats in the same run.

* Quality: perplexity on the held-out token ids of benchmarks/quant.py (4 rows of 256 tokens from
  the second half of the embedded Shakespeare corpus, lmjax's tokenizer), llama.cpp fed the same
  ids one at a time (`logits_all=True`, log-softmax in float64 numpy); the max abs difference of
  llama.cpp's logits from lmjax's kept-Q4_1 logits on the same positions (both dequantize the same
  blocks, but llama.cpp also rounds activations to 8 bits for its quantized dot products, so they
  are close, not equal; a float32 KV cache there does not shrink the difference).
* `--decode-perplexity`: the same perplexity with 16 tokens fed at a time through the cache
  (products of 16 rows: with int8 activations, the kernel's), packed formats.
* Speed: batch 1, a 128-token prompt, 128 greedy tokens; decode tokens/s `127 / (t(128) - t(1))`
  (prefill cancels), best of `--repeats`, every engine interleaved in each repeat. llama.cpp:
  `eval` of the prompt, then argmax of the last logits and `eval` of that token, 127 times; at 1
  and 2 threads (a 2-thread llama.cpp spin-waits badly on a loaded 2-core machine); each lmjax
  format as a ratio of the faster llama.cpp. Time to first token: the best `t(1)` (the 128-token
  prompt's prefill and one token; llama.cpp evaluates its prompt one token at a time, see
  above), `first_token_vs_llama_cpp` that of the same llama.cpp over lmjax's (> 1: lmjax
  sooner). Greedy agreement of every engine with lmjax float32.
* The machine: load average at start and end, read bandwidth (benchmarks/common.py).

    python benchmarks/vs_llama_cpp.py [--repeats 3] [--formats float32,packed-bfloat16,...]

Writes benchmarks/results/llama_cpp.json.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quant  # noqa: E402  (the held-out text, the formats, perplexity: one definition)

import infer  # noqa: E402
import lmjax  # noqa: E402
import lmjax.convert.pretrained  # noqa: E402
from infer.sampling import Greedy  # noqa: E402

NAME = "smollm2-135m-instruct"
PROMPT, NEW, CACHE = quant.PROMPT, quant.NEW, quant.CACHE
PPL_LEN, PPL_ROWS = quant.PPL_LEN, quant.PPL_ROWS
PARITY_POSITIONS = 16


def held_out_ids(tok) -> list[int]:
  """benchmarks/quant.py's ids: the prompt, then PPL_ROWS x PPL_LEN held-out tokens."""
  text = gzip.open(quant.CORPUS, "rt").read()
  return tok.encode(text[len(text) // 2:][:40_000])


def llama(threads: int):
  import llama_cpp

  path = lmjax.convert.pretrained.resolve(NAME)
  return llama_cpp.Llama(model_path=str(path), n_ctx=2 * CACHE, n_batch=1, n_ubatch=1,
                         n_threads=threads, n_threads_batch=threads, logits_all=True,
                         verbose=False)


def llama_logits(llm, ids) -> np.ndarray:
  """[T, V] float32 logits of llama.cpp on `ids` from an empty cache, one token per decode."""
  llm.reset()
  llm.eval(list(ids))
  return np.array(llm.scores[:len(ids)])


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def llama_perplexity(llm, ids) -> tuple[float, np.ndarray]:
  """Perplexity over PPL_ROWS rows of PPL_LEN ids (each row from an empty cache), as
  quant.perplexity does it; also the first row's logits."""
  nll, first = [], None
  for r in range(PPL_ROWS):
    row = np.asarray(ids[r * PPL_LEN:(r + 1) * PPL_LEN])
    logits = llama_logits(llm, row)
    first = logits if first is None else first
    lp = log_softmax64(logits[:-1])
    nll.append(-lp[np.arange(len(row) - 1), row[1:]])
  return float(np.exp(np.mean(np.concatenate(nll)))), first


def llama_run(llm, prompt, n: int) -> list[int]:
  """Greedy: the prompt, then n tokens (n - 1 single-token decodes after the prompt's)."""
  llm.reset()
  llm.eval(list(prompt))
  out = []
  for i in range(n):
    out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    if i < n - 1:
      llm.eval([out[-1]])
  return out


def lmjax_nbytes(params) -> float:
  if isinstance(params, lmjax.packed.PackedParams):
    return sum(x.nbytes for x in jax.tree.leaves(params))
  return lmjax.quant.nbytes(params)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--formats", default="float32,packed-bfloat16,packed-int8,packed-int8-a8,"
                  "packed-int4,packed-int4-a8,packed-q4_1-kept,packed-q4_1-kept-a8")
  ap.add_argument("--threads", default="1,2", help="llama.cpp thread counts to time")
  ap.add_argument("--name", default="llama_cpp")
  ap.add_argument("--decode-perplexity", action="store_true",
                  help="also the perplexity of packed formats fed 16 tokens at a time (the "
                  "few-row decode products, lmjax.quant.cpu_int4's where it applies)")
  args = ap.parse_args()
  formats = args.formats.split(",")
  load0 = os.getloadavg()
  bandwidth = common.memory_bandwidth(256)
  path = lmjax.convert.pretrained.resolve(NAME)
  runs, rows, kept_logits = {}, [], None

  for fmt in formats:
    cfg, params, tok = quant.load(fmt)
    model = lmjax.CausalLM(cfg)
    ids = held_out_ids(tok)
    prompt, held = ids[:PROMPT], ids[PROMPT:]

    def run(n, model=model, params=params, prompt=prompt):
      return infer.generate(model, params, [prompt], max_new_tokens=n, sampler=Greedy(),
                            ignore_eos=True, add_bos=False, cache_size=CACHE).tokens[0]
    runs[fmt] = {"run": run, "tokens": run(NEW)}
    run(1)
    rows.append({"engine": "lmjax " + fmt, "MB": lmjax_nbytes(params) / 1e6,
                 "perplexity": quant.perplexity(model, params, held)})
    if args.decode_perplexity and fmt.startswith("packed-"):
      rows[-1]["decode_perplexity"] = quant.chunked_perplexity(model, params, held)
    if fmt == "q4_1-kept":
      f = quant.forward(model, params)
      kept_logits = np.asarray(f(params, np.asarray(held[:PPL_LEN])[None])[0], np.float32)
    print(f"{fmt}: {rows[-1]['MB']:.1f} MB, perplexity {rows[-1]['perplexity']:.3f}", flush=True)

  parity = {}
  for threads in [int(t) for t in args.threads.split(",")]:
    llm = llama(threads)
    name = f"llama.cpp {threads} thread" + ("s" if threads > 1 else "")
    row = {"engine": name, "MB": path.stat().st_size / 1e6}
    if not parity:  # quality once: the thread count does not change the math
      row["perplexity"], first = llama_perplexity(llm, held)
      if kept_logits is not None:
        diff = np.abs(first - kept_logits)
        parity = {"positions": PPL_LEN, "max_abs_diff_first": float(
            diff[:PARITY_POSITIONS].max()), "first_positions": PARITY_POSITIONS,
                  "max_abs_diff_all": float(diff.max()),
                  "mean_abs_diff_all": float(diff.mean()),
                  "logit_abs_max": float(np.abs(kept_logits).max()),
                  "argmax_agree": float(np.mean(first.argmax(-1) == kept_logits.argmax(-1)))}
        print(f"llama.cpp vs lmjax kept Q4_1 logits: {parity}", flush=True)
    runs[name] = {"run": lambda n, llm=llm: llama_run(llm, prompt, n)}
    runs[name]["tokens"] = runs[name]["run"](NEW)
    rows.append(row)

  best = quant.decode_seconds(runs, args.repeats)
  ref = runs["float32"]["tokens"] if "float32" in runs else None
  llama_names = [r["engine"] for r in rows if r["engine"].startswith("llama.cpp")]
  base_name = min(llama_names, key=lambda f: best[f])
  base = (NEW - 1) / best[base_name]
  for row in rows:
    f = row["engine"].removeprefix("lmjax ")
    row["decode_tok_s"] = (NEW - 1) / best[f]
    row["vs_llama_cpp"] = row["decode_tok_s"] / base
    row["first_token_s"] = runs[f]["first_token_s"]
    row["first_token_vs_llama_cpp"] = runs[base_name]["first_token_s"] / row["first_token_s"]
    row["roofline_tok_s"] = bandwidth / (row["MB"] * 1e6)
    if ref is not None:
      same = [a == b for a, b in zip(runs[f]["tokens"], ref)]
      row["agree_prefix"] = (same + [False]).index(False) / len(ref)
      row["agree_all"] = float(np.mean(same))
  load1 = os.getloadavg()
  cols = ["engine", "MB", "perplexity", "decode_perplexity", "agree_prefix", "agree_all",
          "decode_tok_s", "vs_llama_cpp", "roofline_tok_s", "first_token_s",
          "first_token_vs_llama_cpp"]
  print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; load {load0} -> {load1}; "
        f"baseline {base_name}")
  print(common.table(rows, cols))
  out = common.write(args.name, {
      "gguf": path.name, "rows": rows, "baseline": base_name, "logit_parity_q4_1_kept": parity,
      "bandwidth_bytes_per_s": bandwidth, "load_start": load0, "load_end": load1,
      "prompt_tokens": PROMPT, "new_tokens": NEW, "repeats": args.repeats})
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
