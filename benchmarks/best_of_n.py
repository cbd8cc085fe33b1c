"""Best-of-N with a reward model: the mean reward and the accuracy of the kept answer, N = 1..16.

The policy (SmolLM2-135M-Instruct) samples `--samples` (16) replies to each of `--prompts`
held-out arithmetic problems (`train.arithmetic`'s `test` split, with the reward run's
`max_steps`/`max_value`; SmolLM2's chat template), in one `infer.generate` call; the reward
model (a run of `python -m train.reward`, default the demo's `runs/reward-demo`) scores all of
them in one batched pass (`infer.RewardScorer`, what `generate(best_of=N, scorer=...)` calls).
Best-of-N keeps, per prompt, the highest-scored of N replies; its expected reward and accuracy
are averaged over the 16 // N disjoint groups of N replies of each prompt (N = 1 is plain
sampling). Accuracy is `train.arithmetic.is_correct` of the kept reply: a check of the reward
model's choice by code, which the reward model never sees. The oracle row keeps a correct reply
whenever one of the N is correct (the best any selector could do). `ranking` is how often the
reward model scores a correct reply above a wrong one of the same prompt (0.5 = chance): its
pairwise accuracy on the policy's own replies rather than on the training pairs' kind.

    python benchmarks/best_of_n.py [--reward-model runs/reward-demo] [--prompts 16]
                                   [--samples 16] [--temperature 1.0] [--max-new-tokens 40]

Writes benchmarks/results/best_of_n.json and best_of_n.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import infer  # noqa: E402
import lmjax  # noqa: E402
from train import arithmetic  # noqa: E402


def selection(scores: np.ndarray, correct: np.ndarray, n: int) -> dict[str, float]:
  """Best-of-`n` over disjoint groups of each prompt's samples `[P, S]`: the mean reward and
  accuracy of the kept reply, and the oracle's accuracy (any of the group correct)."""
  p, s = scores.shape
  g = s // n
  sc = scores[:, :g * n].reshape(p, g, n)
  ok = correct[:, :g * n].reshape(p, g, n)
  pick = np.argmax(sc, axis=-1)[..., None]
  return {"n": n, "groups": p * g,
          "mean_reward": float(np.take_along_axis(sc, pick, -1).mean()),
          "accuracy": float(np.take_along_axis(ok, pick, -1).mean()),
          "oracle_accuracy": float(ok.any(-1).mean())}


def ranking(scores: np.ndarray, correct: np.ndarray) -> dict[str, float | int | None]:
  """How the reward model ranks the policy's own replies `[P, S]`: the share of (correct, wrong)
  reply pairs of the same prompt where the correct one scores higher (0.5 = chance), and the
  mean score of correct and of wrong replies."""
  wins, pairs = 0.0, 0
  for s, ok in zip(scores, correct):
    good, bad = s[ok], s[~ok]
    pairs += good.size * bad.size
    diff = good[:, None] - bad[None, :]
    wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
  return {"pairs": pairs, "correct_over_wrong": wins / pairs if pairs else None,
          "mean_reward_correct": float(scores[correct].mean()) if correct.any() else None,
          "mean_reward_wrong": float(scores[~correct].mean()) if (~correct).any() else None}


def plot(rows: list[dict], path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ns = [r["n"] for r in rows]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  a1.plot(ns, [r["mean_reward"] for r in rows], "o-")
  a1.set_xscale("log", base=2)
  a1.set_xticks(ns, [str(n) for n in ns])
  a1.set_xlabel("N (replies sampled per prompt)")
  a1.set_ylabel("mean reward of the kept reply")
  a1.grid(alpha=0.3)
  a2.plot(ns, [r["accuracy"] for r in rows], "o-", label="best-of-N by the reward model")
  a2.plot(ns, [r["oracle_accuracy"] for r in rows], "s--", label="oracle (any correct)")
  a2.set_xscale("log", base=2)
  a2.set_xticks(ns, [str(n) for n in ns])
  a2.set_xlabel("N")
  a2.set_ylabel("accuracy of the kept answer")
  a2.set_ylim(0, 1)
  a2.grid(alpha=0.3)
  a2.legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--reward-model", default="runs/reward-demo")
  ap.add_argument("--policy", default="smollm2-135m-instruct")
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--samples", type=int, default=16)
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--max-new-tokens", type=int, default=40)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  if a.samples < 1 or a.samples & (a.samples - 1):
    raise SystemExit(f"--samples={a.samples}: use a power of two (N = 1, 2, 4, ... samples)")
  if not Path(a.reward_model).is_dir():
    raise SystemExit(f"no reward model at {a.reward_model!r}: train one first "
                     "(python -m train.reward) or pass --reward-model")
  load_start = os.getloadavg()
  scorer = infer.reward_scorer(a.reward_model)
  data = {"max_steps": 2, "max_value": 20}
  run_config = Path(a.reward_model) / "config.json"
  if run_config.is_file():
    saved = json.loads(run_config.read_text()).get("data", {})
    data = {k: saved.get(k, v) for k, v in data.items()}
  probs = arithmetic.problems(a.prompts, a.seed, "test", **data)
  cfg, params, tok = lmjax.load_pretrained(a.policy)
  prompts = [infer.prompts.render_chat([{"role": "user", "content": p["prompt"]}], tok)
             for p in probs]
  t0 = time.perf_counter()
  out = infer.generate(lmjax.CausalLM(cfg), params, prompts, tokenizer=tok,
                       max_new_tokens=a.max_new_tokens, num_samples=a.samples, seed=a.seed,
                       sampler=infer.sampling.TopP(p=1.0, temperature=a.temperature))
  t_gen = time.perf_counter() - t0
  t0 = time.perf_counter()
  cands = [out.candidate(k) for k in range(len(prompts) * a.samples)]
  scores = np.asarray(scorer.score_many([p for p in prompts for _ in range(a.samples)], cands),
                      np.float64).reshape(len(prompts), a.samples)
  t_score = time.perf_counter() - t0
  correct = np.asarray([arithmetic.is_correct(out.text[k], probs[k // a.samples]["answer"])
                        for k in range(len(cands))]).reshape(len(prompts), a.samples)
  ns = [1 << i for i in range(a.samples.bit_length())]
  rows = [selection(scores, correct, n) for n in ns]
  print(common.table(rows, ["n", "groups", "mean_reward", "accuracy", "oracle_accuracy"]))
  rank = ranking(scores, correct)
  print(f"the reward model ranks a correct reply above a wrong one of the same prompt in "
        f"{rank['correct_over_wrong']} of {rank['pairs']} pairs")
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"generation {t_gen:.0f} s, scoring {t_score:.0f} s ({len(cands)} replies) on "
          f"{jax.device_count()} CPU device(s)")
  print(note)
  title = (f"best-of-N, {a.policy} sampled at T={a.temperature}, reward model "
           f"{a.reward_model}; {len(prompts)} held-out arithmetic prompts")
  png = common.RESULTS / "best_of_n.png"
  common.RESULTS.mkdir(parents=True, exist_ok=True)
  plot(rows, png, title)
  path = common.write("best_of_n", {
      "policy": a.policy, "reward_model": a.reward_model, "prompts": len(prompts),
      "samples_per_prompt": a.samples, "temperature": a.temperature,
      "max_new_tokens": a.max_new_tokens, "arithmetic": data, "rows": rows,
      "reward_mean_all": float(scores.mean()), "accuracy_all": float(correct.mean()),
      "ranking": rank,
      "example": {"prompt": probs[0]["prompt"], "best": out.text[int(np.argmax(scores[0]))],
                  "worst": out.text[int(np.argmin(scores[0]))]},
      "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path} and {png}")


if __name__ == "__main__":
  main()
