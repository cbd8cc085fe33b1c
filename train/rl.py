"""RLHF by policy gradient from the command line: GRPO, RLOO and PPO with a KL to a reference.

    python -m train.rl [--policy MODEL] [--reward REWARD] [--data SOURCE] [--workdir DIR]
                       [--set rl.algorithm=grpo|rloo|ppo] [--set key=value ...]

MODEL is what `lmjax.load_pretrained` takes or one of our run dirs (an SFT run); REWARD is
`python:module:function` (TRL's `fn(prompts, completions, **row_fields) -> list[float]`; several
comma-separated, `*w` weights them: `train.rl_rewards`) or a reward model's folder (a
`train.reward` run dir); SOURCE is `arithmetic` (embedded) or `jsonl:PATH` / `tfds:NAME` of
prompt-only rows (`train.rl_data`). With no arguments, the demo: SmolLM2-135M-Instruct learns
one-step arithmetic word problems (`train.rl_arithmetic`: 1 for the right answer (`correct`),
0.1 for the "The answer is N" format (`formatted`), one worked example before each question);
held-out accuracy (greedy, `correct`) before and after is printed and
`rl.png` plots reward, KL and accuracy. `--set peft.method=lora` trains a LoRA adapter instead
of every weight (`train.peft_config`); the reference is then the base without the adapter.

One loop for the three algorithms (Shao et al., 2024; Ahmadian et al., 2024; Schulman et al.,
2017 / Ouyang et al., 2022), each step:

1. rollout: `data.prompts_per_step` prompts x `rl.num_generations` samples from the current
   policy with `infer`'s compiled KV-cache decoder, on the trainer's own sharded params
   (`train.rollout`), seeded by (run seed, step);
2. rewards (`train.rl_rewards`), then a jitted scoring pass: the frozen reference's log-probs
   (the reference is the initial policy, held by the trainer as `Frozen` params), and for
   several updates per rollout or PPO the rollout policy's own log-probs and values;
3. advantages: GRPO group-normalized, RLOO leave-one-out, PPO GAE over KL-penalized rewards
   (`train.rl_data.advantages`, `train.rl_algos`);
4. `rl.updates_per_rollout` optimizer steps (`Trainer.train_step`, epochs of
   `rl.num_minibatches` shuffled minibatches) on the loss of `train.rl_loss`.

Logged per step (`metrics.jsonl`, TensorBoard): reward mean/std and each reward's mean,
completion length, KL, entropy, clip fraction, sampler/learner log-prob mismatch, loss, gradient
norm, rollout and learner tokens/s. Checkpoints are written between steps (every
`checkpoint.every` and at the end); rerunning resumes bitwise (prompt order and rollout seeds
derive from the step). DIR also holds `config.json`, the tokenizer, `report.json`, `rl.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

import lmjax
from infer import sampling
from lmjax import checkpoint as layout
from train import config as config_lib
from train import job as job_lib
from train import peft_train, rl_data, rl_loss, rl_report, rl_rewards, rollout, sft
from train import qat as qat_lib
from train.checkpointing import Checkpointer
from train.optimizer import learning_rate_schedule, make_optimizer
from train.rl_config import PRESETS, RLConfig
from train.sft_config import MODEL_MAY_CHANGE
from train.trainer import Frozen, NonFiniteLossError, Trainer, TrainState

log = logging.getLogger("train.rl")


def resolve_model(config: RLConfig, sets: Sequence[str] = ()) -> RLConfig:
  """Applies `--set`s; reads the policy's model config and applies the `model.*` ones."""
  model_sets = [s for s in sets if s.startswith("model.")]
  stub = config_lib.apply_overrides(dataclasses.replace(config, model=None),
                                    [s for s in sets if not s.startswith("model.")])
  model = (config.model if config.model is not None and stub.policy == config.policy
           else sft.base_config(stub.policy))
  bad = sorted({s.partition("=")[0][len("model."):] for s in model_sets} - set(MODEL_MAY_CHANGE))
  if bad:
    raise ValueError(f"--set model.{bad[0]}: RL keeps the policy's shape; model keys that may "
                     f"change: {list(MODEL_MAY_CHANGE)}")
  out = dataclasses.replace(stub, model=model)
  return config_lib.apply_overrides(out, model_sets) if model_sets else out


@functools.lru_cache(maxsize=8)
def peft_setup(config: RLConfig) -> peft_train.PeftSetup | None:
  """The `peft` section's adapter and frozen base (`train.peft_train`); None: full training."""
  model = lmjax.model_for(config.model)
  x = lmjax.counting.example_inputs(config.model)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *x)["params"])
  return peft_train.setup(config.peft, model, boxed)


def build_trainer(config: RLConfig, mesh=None) -> Trainer:
  """The one trainer over the policy (+ PPO's value head), the reference `Frozen` beside it.

  Full training: the policy's params train and the reference is a second, frozen copy. With a
  `peft` adapter only the adapter trains; the frozen base is held once and serves both the
  policy (base + adapter) and the reference (the base alone, `PeftSetup.reference`)."""
  model = lmjax.model_for(config.model)
  x = lmjax.counting.example_inputs(config.model)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *x)["params"])
  rl = config.rl
  ps = peft_setup(config)
  # `quant.qat` (never beside peft): the policy as served, in the loss and in the rollouts.
  fq = qat_lib.quantizer(config.quant, model) if config.quant.enabled else (lambda p: p)
  init_policy = ps.init_params if ps else (lambda key: model.init(key, *x)["params"])
  adapted = ps.combine if ps else (lambda t, f: fq(t))
  init_params = ps.init_params if ps else None
  if rl.algorithm == "ppo":
    d = config.model.model_dim

    def init_params(key):
      head = rl_loss.ValueHead().init(key, jax.numpy.zeros((1, 1, d)))["params"]
      return {"policy": init_policy(key), "value": head}

    def combine(t, f):
      policy = adapted(t["policy"], f)
      return {**t, "policy": policy, "reference": ps.reference(policy) if ps else f}
  elif ps:
    combine = ps.frozen_with(lambda policy, ref: {"policy": policy, "reference": ref}).combine
  else:
    combine = lambda t, f: {"policy": fq(t), "reference": f}  # noqa: E731
  updates = config.train.steps * rl.updates_per_rollout
  trainer = Trainer(ps.model if ps else model, rl_loss.make_loss(rl),
                    make_optimizer(config.optimizer, updates),
                    job_lib.build_mesh(config.mesh) if mesh is None else mesh, init_inputs=x,
                    global_batch=config.rows // rl.num_minibatches,
                    grad_accum=config.train.grad_accum, seed=config.train.seed,
                    learning_rate=learning_rate_schedule(config.optimizer, updates),
                    init_params=init_params, frozen=Frozen(ps.abstract if ps else boxed, combine))
  qat_lib.check(config.quant, model, policy_of(config, trainer.abstract_state.params))
  return trainer


def policy_of(config: RLConfig, params):
  """The policy's trainable part of the train state's params (PPO adds the value head)."""
  return params["policy"] if config.rl.algorithm == "ppo" else params


class Loop:
  """One RL run's pieces, checked before any rollout (`run` drives it)."""

  def __init__(self, config: RLConfig, workdir, mesh=None):
    self.config = config = job_lib.resolve_precision(
        resolve_model(config) if config.model is None else config)
    self.workdir = layout.run_path(workdir)
    self.trainer = build_trainer(config, mesh)
    self.peft = peft_setup(config)
    self.model = self.trainer.model  # the learner's (a PeftModel with an adapter)
    self.decoder = lmjax.model_for(config.model)  # rollouts: `infer` takes Adapted params
    self.rewards = rl_rewards.load(config.reward, self.trainer.mesh)
    self.ckpt = Checkpointer(self.workdir, keep=config.checkpoint.keep,
                             keep_best=config.checkpoint.keep_best,
                             async_save=config.checkpoint.async_save)
    self.score = rl_loss.make_score(self.model, config.rl)
    rl = config.rl
    self.sampler = sampling.Sampler(temperature=rl.temperature,
                                    top_p=None if rl.top_p == 1 else rl.top_p)

  def setup(self, load_policy=None):
    """Restores or loads the policy, reads and checks the prompts and rewards (before any
    rollout). `load_policy(config, mesh) -> (params, tokenizer)` replaces the loader (tests)."""
    c, t = self.config, self.trainer
    restored = None
    if self.ckpt.steps():
      if not c.checkpoint.resume:
        raise ValueError(f"{self.workdir} holds checkpoints at steps {self.ckpt.steps()} and "
                         "checkpoint.resume=false: use another --workdir")
      restored = self.ckpt.restore_latest(t.abstract_state, c.to_dict(), TrainState)
    load = load_policy or (lambda cfg, mesh: sft.load_base(cfg.policy, cfg.model, mesh))
    params, self.tokenizer = load(c, t.mesh)
    self.train_set = rl_data.encode(c, rl_data.load_rows(c, "train"), self.tokenizer, "train")
    self.heldout = rl_data.encode(c, rl_data.load_rows(c, "heldout"), self.tokenizer, "heldout")
    _, texts, fields = self.train_set.take(range(min(2, len(self.train_set))))
    rl_rewards.check_on(self.rewards, texts, fields)
    t.set_frozen(self.peft.frozen_value(params) if self.peft else params)
    if restored is None and self.peft:  # a fresh adapter (LoRA: B = 0, the policy is the base)
      self.state, self.start = t.init_state(), 0
    elif restored is None:
      if c.rl.algorithm == "ppo":
        head = jax.eval_shape(t._init_params)["value"]
        params = {"policy": params,
                  "value": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _unbox(head))}
      self.state, self.start = job_lib.state_from_params(t, params), 0
    else:
      self.state, self.start, _ = restored

  def params(self) -> dict:
    """`{"policy", "reference"}` (+ PPO's `"value"`) as the loss sees them: with an adapter the
    policy is `Adapted(base, adapter)` and the reference `Adapted(base, {})`, one base."""
    t = self.trainer
    return t.frozen.combine(self.state.params, t.frozen_params)

  # --- one step ----------------------------------------------------------------------------

  def rollout(self, step: int, prompt_idx, prompts: rl_data.PromptSet, *, greedy=False,
              num_samples=None):
    c = self.config
    ids, texts, fields = prompts.take(prompt_idx, num_samples or c.rl.num_generations)
    ro = rollout.sample(self.decoder, self.params()["policy"], ids,
                        tokenizer=self.tokenizer, num_samples=num_samples or c.rl.num_generations,
                        max_new_tokens=c.rl.max_new_tokens, length=c.rl.length,
                        sampler=sampling.Greedy() if greedy else self.sampler,
                        seed=rollout.step_seed(c.data.seed, step))
    total, parts = rl_rewards.score(self.rewards, texts, ro.texts, fields)
    return ro, total, parts

  def step(self, step: int) -> dict[str, float]:
    """Rollout, rewards, scoring, advantages and the updates of RL step `step`."""
    c, t, rl = self.config, self.trainer, self.config.rl
    t0, cpu0 = time.perf_counter(), time.process_time()
    idx = rl_data.step_prompts(len(self.train_set), c.data.prompts_per_step, step, c.data.seed)
    ro, total, parts = self.rollout(step, idx, self.train_set)
    t1 = time.perf_counter()
    with jax.set_mesh(t.mesh):
      p = self.params()
      scored = jax.device_get(self.score(p["policy"], p["reference"], p.get("value"),
                                         ro.tokens))
    batch = {"tokens": ro.tokens, "completion_mask": ro.completion_mask,
             "sampler_log_probs": ro.log_probs, **scored,
             **rl_data.advantages(c, total, ro.completion_mask, scored)}
    batch.setdefault("old_log_probs", ro.log_probs)
    if rl.algorithm == "ppo":
      batch.setdefault("returns", batch["advantages"])
    sums: dict[str, float] = {}
    epochs = rl.updates_per_rollout // rl.num_minibatches
    mb = c.rows // rl.num_minibatches
    for e in range(epochs):
      order = (np.arange(c.rows) if rl.num_minibatches == 1 else
               np.random.default_rng([c.data.seed, step, e]).permutation(c.rows))
      for k in range(rl.num_minibatches):
        rows = order[k * mb:(k + 1) * mb]
        self.state, m = t.train_step(self.state, step * rl.updates_per_rollout
                                     + e * rl.num_minibatches + k,
                                     {n: np.asarray(v)[rows] for n, v in batch.items()})
        m = {n: float(v) for n, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss_sum"]) and math.isfinite(m["grad_norm"])):
          raise NonFiniteLossError(step + 1, m["loss_sum"] / max(m["tokens"], 1.0),
                                   m["grad_norm"])
        for n, v in m.items():
          sums[n] = sums.get(n, 0.0) + v
    t2 = time.perf_counter()
    ntok = max(sums.pop("completion_tokens"), 1.0)
    u = rl.updates_per_rollout
    out = {"reward": float(total.mean()), "reward_std": float(total.std()),
           **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
           "completion_length": float(ro.completion_lengths.mean()),
           "eos_fraction": float(np.mean([r == "eos" for r in ro.stop_reason])),
           "loss": sums.pop("loss_sum") / max(sums.pop("tokens"), 1e-9),
           "grad_norm": sums.pop("grad_norm") / u,
           **{k: v / ntok for k, v in sums.items()},
           "rollout_s": t1 - t0, "learner_s": t2 - t1, "step_s": t2 - t0,
           "cpu_s": time.process_time() - cpu0,
           "rollout_tokens_per_s": float(ro.completion_lengths.sum()) / (t1 - t0),
           "learner_tokens_per_s": u / rl.num_minibatches * ro.tokens.size / (t2 - t1)}
    return out

  def evaluate(self) -> dict[str, float]:
    """Greedy held-out rewards (each reward function's mean; the demo's `correct` is accuracy)."""
    if not len(self.heldout):
      return {}
    _, total, parts = self.rollout(0, range(len(self.heldout)), self.heldout, greedy=True,
                                   num_samples=1)
    return {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean())
                                               for k, v in parts.items()}}


def _unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def run(config: RLConfig, workdir, *, load_policy=None, stop_after: int | None = None,
        mesh=None) -> dict:
  """Trains (or resumes) the RL run in `workdir`; returns the final figures and `state`.
  `stop_after`: return after that many steps of this call (tests: a stopped run)."""
  loop = Loop(config, workdir, mesh)
  c = loop.config
  try:
    loop.setup(load_policy)
    is_main = jax.process_index() == 0
    if is_main:
      loop.workdir.mkdir(parents=True, exist_ok=True)
      job_lib.write_json(loop.workdir / layout.CONFIG_FILE, c.to_dict())
      if not layout.has_tokenizer(loop.workdir):
        try:
          layout.save_run_tokenizer(loop.tokenizer, loop.workdir)
        except ValueError as e:  # a tokenizer lmjax cannot save (tests' character tokenizer)
          log.warning("tokenizer not saved: %s", e)
    writer = rl_report.MetricsWriter(loop.workdir, loop.start, enabled=is_main)
    cpu0, wall0 = time.process_time(), time.perf_counter()  # this process's CPU, all threads
    before = writer.before(loop.evaluate) if c.data.heldout_prompts else {}
    step = loop.start
    last_eval = {}
    try:
      while step < c.train.steps and (stop_after is None or step < loop.start + stop_after):
        metrics = loop.step(step)
        step += 1
        writer.train(step, metrics, c.train.log_every, c.train.steps)
        end = step == c.train.steps
        if c.train.eval_every and (step % c.train.eval_every == 0 or end) and len(loop.heldout):
          last_eval = loop.evaluate()
          writer.eval(step, {**last_eval, "cpu_s": time.process_time() - cpu0,
                             "wall_s": time.perf_counter() - wall0})
        if end or (c.checkpoint.every and step % c.checkpoint.every == 0) or (
            stop_after is not None and step == loop.start + stop_after):
          loop.ckpt.save(step, loop.state, c.to_dict(), {"step": step})
      loop.ckpt.wait()
      result = {"step": step, "before": before, "heldout": last_eval,
                "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}
      if step == c.train.steps and loop.peft:  # adapter/: lmjax.checkpoint.load_run reads it
        loop.peft.save(loop.workdir, c.model, policy_of(c, loop.state.params), base=c.policy)
      if step == c.train.steps and is_main:
        writer.plot()
        job_lib.write_json(loop.workdir / "report.json", result)
    finally:
      writer.close()
    result["state"] = loop.state
    return result
  finally:
    loop.ckpt.close()


# --- the command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, caches: bool = False) -> int:
  """`python -m train.rl`; `caches`: JAX's persistent compilation cache, as the command line
  runs (a call from Python leaves it alone)."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  job = job_lib.Job()
  job.name, job.presets = "rl", PRESETS
  p = job_lib.parser(job, __doc__)
  p.add_argument("--policy", default=None, help="the policy: a pretrained name/path or run dir")
  p.add_argument("--reward", default=None, help="python:module:function[,...][*weight]")
  p.add_argument("--data", default=None, help="arithmetic (embedded), jsonl:PATH or tfds:NAME")
  args = p.parse_args(argv)
  logging.getLogger("train").setLevel(logging.INFO if args.verbose else logging.NOTSET)
  sets = [s for g in args.sets for s in g]
  for flag, key in ((args.policy, "policy"), (args.reward, "reward"), (args.data, "data.source")):
    if flag:
      sets.insert(0, f"{key}={flag}")
  try:
    config = resolve_model(PRESETS[args.config](), sets)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = args.workdir or job_lib.default_workdir(job, args.config)
  if caches:
    lmjax.compilation_cache.enable_for_command("python -m train.rl")
  try:
    result = run(config, workdir)
  except (ValueError, FloatingPointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  rl_report.print_summary(result)
  print(f"wrote {workdir}: {job_lib.workdir_contents(workdir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(caches=True))
