"""Tokens per second the data pipeline delivers (train split, batch 8 x seq 1024 by default).

Sources: the embedded Shakespeare corpus, and a larger synthetic corpus (Shakespeare's words
drawn at random into documents of log-normal length, written as a `.txt` file). Baseline,
measured in the same run: SentencePiece alone encoding the same documents in one thread; the
ratio pipeline / baseline says what packing, batching and grain cost on top of tokenizing.

The figure that matters is the pipeline's tokens/s against the model's training step tokens/s
(e.g. gpt2-124m): the pipeline must not be the bottleneck. That comparison is added by the
trainer benchmark (`model_step_tokens_per_s` below stays null here).

    python benchmarks/data_pipeline.py [--batches 60] [--synthetic_mb 20]

Prints a table and writes benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmjax.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402
from train import shakespeare_tfds  # noqa: E402
from train.data import DataConfig, build_tokenizer, make_pipeline  # noqa: E402
from train.sources import resolve_source  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "data_pipeline.json"


def synthetic_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
  """Writes documents of random Shakespeare words, blank-line separated; returns their count."""
  words = shakespeare_tfds.read_corpus().split()
  rng = random.Random(seed)
  written, n = 0, 0
  with open(path, "w") as f:
    while written < megabytes * 1e6:
      length = max(5, int(rng.lognormvariate(5.5, 1.0)))  # median ~250 words
      lines = [" ".join(rng.choices(words, k=min(12, length - i))) for i in range(0, length, 12)]
      doc = "\n".join(lines) + "\n\n"
      f.write(doc)
      written += len(doc)
      n += 1
  return n


def measure(cfg: DataConfig, tok, batches: int, warmup: int = 3) -> dict:
  it = make_pipeline(cfg, tok, "train", process_index=0, process_count=1)
  t0 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  t_first = time.perf_counter() - t0
  real = total = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    seg = b.get("segment_ids", b.get("encoder_segment_ids"))
    real += int((seg > 0).sum())
    total += seg.size
  dt = time.perf_counter() - t0
  it.close()
  return {"tokens_per_s": real / dt, "slots_per_s": total / dt, "fill": real / total,
          "batches": batches, "seconds": dt, "startup_s": t_first}


def baseline(cfg: DataConfig, tok, max_docs: int = 3000) -> dict:
  """SentencePiece alone (one thread, one document per call) on the source's documents."""
  src = resolve_source(cfg.source, "train", data_dir=cfg.tfds_data_dir)
  texts = [src[i]["text"] for i in range(min(len(src), max_docs))]
  t0 = time.perf_counter()
  n = sum(len(tok.encode(t)) for t in texts)
  dt = time.perf_counter() - t0
  return {"tokens_per_s": n / dt, "documents": len(texts), "tokens": n}


def versions() -> dict:
  out = {"python": platform.python_version()}
  for pkg in ("numpy", "grain", "jax", "tensorflow-datasets", "sentencepiece", "array-record"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=60)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--synthetic_mb", type=float, default=20.0)
  parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
  args = parser.parse_args()

  work = Path(tempfile.mkdtemp(prefix="lmjax-bench-"))
  base = DataConfig(batch_size=args.batch_size, seq_len=args.seq_len,
                    tfds_data_dir=str(work / "tfds"))
  t0 = time.perf_counter()
  shakespeare_tfds.prepare(base.tfds_data_dir)
  prepare_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  tok = build_tokenizer(dataclasses.replace(base, tokenizer_cache_dir=str(work / "tok")))
  tokenizer_s = time.perf_counter() - t0

  synth = work / "synthetic.txt"
  n_docs = synthetic_corpus(synth, args.synthetic_mb)
  synth_cfg = dataclasses.replace(base, source=f"txt:{synth}")
  # The synthetic corpus gets its own tokenizer, as a run on it would.
  synth_tok = train_tokenizer(
      [synth.read_text()[:20_000_000]], TokenizerConfig(), cache_dir=work / "tok")

  runs = []
  for name, cfg, t in [("shakespeare", base, tok),
                       (f"synthetic {args.synthetic_mb:g} MB", synth_cfg, synth_tok)]:
    ref = baseline(cfg, t)
    for objective in ("causal_lm", "masked_lm", "span_corruption"):
      for workers in args.workers if objective == "causal_lm" else [0]:
        c = dataclasses.replace(cfg, objective=objective, num_workers=workers)
        r = measure(c, t, args.batches)
        runs.append({"corpus": name, "objective": objective, "num_workers": workers, **r,
                     "tokenizer_only_tokens_per_s": ref["tokens_per_s"],
                     "ratio_to_tokenizer_only": r["tokens_per_s"] / ref["tokens_per_s"]})

  print(f"batch {args.batch_size} x seq {args.seq_len}; {os.cpu_count()} CPU cores; "
        f"tfds prepare {prepare_s:.1f} s, tokenizer training {tokenizer_s:.1f} s")
  header = (f"{'corpus':<18} {'objective':<16} {'workers':>7} {'tokens/s':>10} "
            f"{'fill':>6} {'sp-only tok/s':>13} {'ratio':>6}")
  print(header)
  print("-" * len(header))
  for r in runs:
    print(f"{r['corpus']:<18} {r['objective']:<16} {r['num_workers']:>7} "
          f"{r['tokens_per_s']:>10.0f} {r['fill']:>6.3f} {r['tokenizer_only_tokens_per_s']:>13.0f} "
          f"{r['ratio_to_tokenizer_only']:>6.2f}")
  print("Compare tokens/s with the model's training step tokens/s (gpt2-124m): "
        "model_step_tokens_per_s in the JSON, filled in by the trainer benchmark.")

  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({
      "benchmark": "data_pipeline",
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count()},
      "versions": versions(),
      "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len,
                   "batches": args.batches, "vocab_size": tok.vocab_size,
                   "synthetic_documents": n_docs, "split": "train"},
      "setup_seconds": {"tfds_prepare": prepare_s, "tokenizer_training": tokenizer_s},
      "baseline": "SentencePiece encode alone, one thread, same documents",
      "runs": runs,
      "model_step_tokens_per_s": None,
      "notes": "tokens/s counts real (non-padding) tokens (encoder tokens for span_corruption); "
               "fill = real / (B*T). Absolute "
               "figures are from a shared 2-core CPU machine.",
  }, indent=1) + "\n")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
