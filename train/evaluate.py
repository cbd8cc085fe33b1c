"""Evaluate a model on tasks, from the command line or from Python.

    python -m train.evaluate --model MODEL_OR_RUN --task TASK[,TASK...] [--set KEY=VALUE ...]
                             [--out results.json]

MODEL_OR_RUN is anything `lmjax.load_pretrained` takes (`smollm2-135m-instruct`, a `.gguf`, a
Hugging Face folder) or one of our run dirs; TASK is `chat`, `arithmetic`, `shakespeare` or
`jsonl:PATH` (`train.eval_tasks`). KEY is a field of `EvalConfig` (`batch_size`, `max_length`)
or of its `task` section (`task.limit`, `task.num_fewshot`, `task.chat_template=on|off|auto`,
`task.seed`, `task.max_new_tokens`, `task.metric`, `task.stop`). Prints a table and writes the
results as JSON.

From Python::

    results = evaluate(model, params, tokenizer, ["chat", "jsonl:my.jsonl"])
    flat = run_tasks(model, params, tokenizer, ["chat"], mesh=trainer.mesh)  # {"chat/acc": ...}

How each kind is scored (as lm-evaluation-harness does; Gao et al., "A framework for few-shot
language model evaluation"):

* choice: one log-likelihood request per choice, `(context, choice)`, encoded whole and split
  where the context's tokens end (trailing spaces of the context move to the choice), all
  requests of a task batched together (`train.eval_scoring.Scorer`);
* generate: greedy `infer.generate` in batches of `batch_size`, cut at the task's stop strings;
* perplexity: each text in rolling windows of `max_length` (`eval_scoring.rolling_windows`),
  the first predicted from the BOS (else EOS) token.

A context starts with the BOS when the tokenizer wants one (lmjax's own tokenizers; not
SmolLM2's, whose convention `add_bos_token` is false) and the text does not already start with
it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from train import eval_metrics as metrics_lib
from train import eval_scoring
from train.eval_tasks import Task, TaskOptions, load_task
from train.overrides import apply_overrides

SAMPLES_KEPT = 5


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How to run the tasks.

  Attributes:
    batch_size: rows per forward pass / prompts per generation batch.
    max_length: the longest row scored (0: the model's `max_len`).
    task: the `TaskOptions` every task gets.
  """

  batch_size: int = 8
  max_length: int = 0
  task: TaskOptions = TaskOptions()

  def __post_init__(self):
    if self.batch_size < 1 or self.max_length < 0:
      raise ValueError(f"batch_size must be >= 1 and max_length >= 0, got "
                       f"batch_size={self.batch_size}, max_length={self.max_length}")


# --- encoding ---------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
  return [int(i) for i in tokenizer.encode(text, add_bos=False, add_eos=False)]


def context_prefix(tokenizer) -> list[int]:
  """The ids a context starts with: the BOS when the tokenizer's convention wants one
  (`add_bos_token`, true when absent: lmjax's own tokenizers)."""
  bos = getattr(tokenizer, "bos_id", None)
  return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", True) else []


def rolling_prefix(tokenizer) -> int:
  """The token the first perplexity window is predicted from: BOS, else EOS."""
  for k in ("bos_id", "eos_id"):
    if (i := getattr(tokenizer, k, None)) is not None:
      return int(i)
  raise ValueError("perplexity needs a tokenizer with a BOS or an EOS token")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """`(context ids, continuation ids)`: the whole text encoded once and split where the
  context's own encoding ends, so the continuation's tokens are those of the whole text
  (trailing spaces of the context go to the continuation first)."""
  n = len(context) - len(context.rstrip(" "))
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  prefix = context_prefix(tokenizer)
  ctx = _encode(tokenizer, context)
  whole = _encode(tokenizer, context + continuation)
  if prefix and ctx[:1] == prefix:
    prefix = []
  if whole[:len(ctx)] != ctx:  # a token spans the boundary: keep the context as it encodes
    return prefix + ctx, _encode(tokenizer, continuation)
  return prefix + ctx, whole[len(ctx):]


# --- the three kinds --------------------------------------------------------------------------


def _choice(task: Task, scorer: eval_scoring.Scorer, tokenizer) -> dict[str, Any]:
  reqs, spans = [], []
  for it in task.items:
    spans.append((len(reqs), len(it.choices)))
    for c in it.choices:
      ctx, cont = encode_pair(tokenizer, it.prompt, c)
      if not ctx:
        ctx = [rolling_prefix(tokenizer)]
      reqs.append((ctx, cont))
  scores = scorer.loglikelihood(reqs)
  acc, acc_norm, gold_lp, gold_tokens = [], [], 0.0, 0
  for it, (s, n) in zip(task.items, spans):
    lps = [x.logprob for x in scores[s:s + n]]
    acc.append(float(metrics_lib.pick(lps) == it.answer))
    lengths = [len(c.strip()) for c in it.choices]
    acc_norm.append(float(metrics_lib.pick(lps, lengths) == it.answer))
    gold_lp += lps[it.answer]
    gold_tokens += len(scores[s + it.answer].token_logprobs)
  out = _means({"acc": acc, "acc_norm": acc_norm})
  if "reply_perplexity" in task.extra_metrics:
    out["reply_perplexity"] = metrics_lib.perplexity_metrics(gold_lp, gold_tokens, 1, 1)[
        "perplexity"]
  return out


def _generate(task: Task, model, params, tokenizer, batch_size: int) -> dict[str, Any]:
  import infer

  prompts = [it.prompt for it in task.items]
  texts: list[str] = []
  for s in range(0, len(prompts), batch_size):
    chunk = prompts[s:s + batch_size]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one compiled loop for all
    out = infer.generate(model, params, padded, tokenizer=tokenizer,
                         max_new_tokens=task.max_new_tokens, sampler=infer.sampling.Greedy(),
                         stop=list(task.stop) or None)
    texts += out.text[:len(chunk)]
  scores = [metrics_lib.score_generation(task.metric, t, it.answer)
            for t, it in zip(texts, task.items)]
  out = _means({task.metric: scores})
  out["samples"] = [{"prompt": it.prompt[-200:], "output": t, "answer": it.answer, "score": sc}
                    for it, t, sc in list(zip(task.items, texts, scores))[:SAMPLES_KEPT]]
  return out


def _perplexity(task: Task, scorer: eval_scoring.Scorer, tokenizer) -> dict[str, Any]:
  prefix = rolling_prefix(tokenizer)
  reqs, owner = [], []
  words = nbytes = tokens = 0
  for i, it in enumerate(task.items):
    ids = _encode(tokenizer, it.prompt)
    windows = eval_scoring.rolling_windows(ids, prefix, scorer.max_length)
    reqs += windows
    owner += [i] * len(windows)
    tokens += len(ids)
    words += len(re.split(r"\s+", it.prompt))
    nbytes += len(it.prompt.encode("utf-8"))
  total = sum(s.logprob for s in scorer.loglikelihood(reqs))
  return {**metrics_lib.perplexity_metrics(total, tokens, words, nbytes), "tokens": tokens}


def _means(values: dict[str, list[float]]) -> dict[str, Any]:
  out, err = {}, {}
  for k, v in values.items():
    out[k], err[k] = metrics_lib.mean_stderr(v)
  return {**out, "stderr": err}


# --- public -----------------------------------------------------------------------------------


def evaluate(model, params, tokenizer, tasks: Sequence[str | Task], *,
             config: EvalConfig | None = None, mesh: jax.sharding.Mesh | None = None
             ) -> dict[str, dict[str, Any]]:
  """Scores a model on tasks.

  Args:
    model: an `lmjax.CausalLM`.
    params: its params (raw tree or `{"params": tree}`; sharded over `mesh` or on the host).
    tokenizer: its tokenizer (an `lmjax` tokenizer; its chat template for chat tasks).
    tasks: task names (`train.eval_tasks`: `chat`, `arithmetic`, `shakespeare`, `jsonl:PATH`)
      or `Task`s.
    config: batch size, max length and task options (default `EvalConfig()`).
    mesh: split the log-likelihood batches over it (data x fsdp must divide the batch size).

  Returns:
    `{task name: {"kind", "n", metric: value, ..., "stderr": {metric: value}}}`; generation
    tasks also keep their first few `samples`.

  Raises:
    ValueError: an unknown task, a bad row or option, before any compute.
  """
  config = config or EvalConfig()
  if isinstance(tasks, str):
    tasks = [t for t in tasks.split(",") if t]
  if not tasks:
    raise ValueError("no tasks given")
  loaded = [t if isinstance(t, Task) else load_task(t, tokenizer, config.task) for t in tasks]
  scorer = None
  if any(t.kind != "generate" for t in loaded):
    scorer = eval_scoring.Scorer(model, params, batch_size=config.batch_size,
                                 max_length=config.max_length or None, mesh=mesh)
  host_params = None
  results = {}
  for task in loaded:
    if task.kind == "choice":
      out = _choice(task, scorer, tokenizer)
    elif task.kind == "perplexity":
      out = _perplexity(task, scorer, tokenizer)
    else:
      if host_params is None:
        from train.report import gather_params

        host_params = gather_params(params) if mesh is not None else params
      out = _generate(task, model, host_params, tokenizer, config.batch_size)
    results[task.name] = {"kind": task.kind, "n": len(task.items), **out}
  return results


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """`{"task/metric": value}` of the numeric metrics of `evaluate`'s results."""
  return {f"{name}/{k}": float(v) for name, r in results.items() for k, v in r.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}


def run_tasks(model, params, tokenizer, task_names: Sequence[str], mesh=None,
              config: EvalConfig | None = None) -> dict[str, float]:
  """What a training job logs at each evaluation: `flatten(evaluate(...))`."""
  return flatten(evaluate(model, params, tokenizer, task_names, config=config, mesh=mesh))


# --- inside a training run (`--set eval.tasks=...`, `train.job`) ------------------------------


def check_tasks(section, tokenizer) -> None:
  """Unknown `eval.tasks` (or task files whose rows do not read) fail before step 0."""
  for name in section.tasks:
    load_task(name, tokenizer, TaskOptions(limit=section.limit))


def training_metrics(section, target, mesh, tokenizer, say=print) -> dict[str, float]:
  """The metrics of `section.tasks` (a `train.config.TaskEvalConfig`) on `target`, the
  `(model, params)` a job is training (None: the job gives no plain model, so nothing is
  scored), batches split over the mesh's data x fsdp."""
  if target is None:
    say("eval.tasks skipped: this job gives no plain model to score")
    return {}
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = -(-section.batch_size // shards) * shards
  options = EvalConfig(batch_size=batch, task=TaskOptions(limit=section.limit))
  out = run_tasks(target[0], target[1], tokenizer, section.tasks, mesh=mesh, config=options)
  say("tasks: " + "  ".join(f"{k} {v:.4g}" for k, v in out.items()))
  return out


def table(results: dict[str, dict[str, Any]]) -> str:
  """The results as a text table: task, kind, n, metric, value, stderr."""
  rows = [("task", "kind", "n", "metric", "value", "stderr")]
  for name, r in results.items():
    for k, v in r.items():
      if k in ("kind", "n", "stderr", "samples", "tokens") or not isinstance(v, (int, float)):
        continue
      err = r.get("stderr", {}).get(k)
      rows.append((name, r["kind"], str(r["n"]), k, f"{v:.4f}",
                   "" if err is None else f"{err:.4f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# --- the command line -------------------------------------------------------------------------


def load_model(name: str):
  """`(model, params, tokenizer)` of a pretrained name/path or a run dir."""
  import lmjax
  from train import sft

  cfg = sft.base_config(name)
  params, tokenizer = sft.load_base(name, cfg, lmjax.make_mesh(data=1, devices=jax.devices()[:1]))
  return lmjax.model_for(cfg), params, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="a pretrained name or path, or a run dir")
  p.add_argument("--task", required=True, help="comma-separated: chat, arithmetic, "
                 "shakespeare, jsonl:PATH")
  p.add_argument("--set", dest="sets", action="append", nargs="+", default=[],
                 metavar="KEY=VALUE", help="e.g. batch_size=16 task.limit=20 task.num_fewshot=0")
  p.add_argument("--out", default=None, help="write the results JSON here")
  args = p.parse_args(argv)
  try:
    config = apply_overrides(EvalConfig(), [s for group in args.sets for s in group])
    tasks = [t for t in args.task.split(",") if t]
    model, params, tokenizer = load_model(args.model)
    loaded = [load_task(t, tokenizer, config.task) for t in tasks]  # bad tasks fail first
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results = evaluate(model, params, tokenizer, loaded, config=config)
  print(table(results))
  if args.out:
    payload = {"model": args.model, "config": dataclasses.asdict(config), "results": results}
    Path(args.out).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
