"""What every training job needs for PEFT: the adapter it trains and the base it freezes.

One call turns a run config's `peft` section into the trainer's pieces:

    ps = peft_train.setup(config.peft, model, boxed)   # None when peft.method=none
    # boxed: the base's boxed abstract params, `jax.eval_shape(lambda: model.init(...)["params"])`
    # (`lmjax.peft.boxed_abstract(config.model)` for a CausalLM)
    Trainer(ps.model, loss, ..., init_params=ps.init_params, frozen=ps.frozen)
    trainer.set_frozen(ps.frozen_value(base_params))     # Job.frozen_params
    state = trainer.init_state()                          # a fresh adapter (Job.initial_state)

- `ps.model` (`lmjax.peft.PeftModel`) takes the combined params (`lmjax.peft.Adapted`) where
  the base model takes a params tree, so a loss written for `model.apply` runs unchanged;
- `ps.init_params(key)` is the boxed adapter alone (plus `train_also` subtrees), so only the
  adapter gets gradients and optimizer state;
- `ps.frozen` is `train.trainer.Frozen(abstract base, ps.combine)`: the base (float, bfloat16,
  or NF4 with `peft.base_quant=nf4`) is an argument of every step, never donated or
  checkpointed;
- `ps.reference(adapted)` is the base without the adapter, from the same arrays: a DPO/RL
  reference at no extra memory. `ps.frozen_with(fn)` builds the `Frozen` whose combine gives
  the loss `fn(policy, reference)`, e.g. `{"policy": policy, "reference": reference}`.

At the end `ps.save(workdir, config.model, state.params, base=...)` writes `WORKDIR/adapter/`
(Hugging Face PEFT files); `lmjax.checkpoint.load_run(WORKDIR)` then gives the adapted params.
`train.sft` is the worked example (its `model`, `partition`, `frozen_params`,
`initial_state` and `report` hooks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import peft
from lmjax.peft import qlora, runs
from train.peft_config import PEFTConfig
from train.trainer import Frozen


@dataclasses.dataclass(frozen=True)
class PeftSetup:
  """A job's PEFT pieces (see the module docstring).

  Attributes:
    config: the run config's `peft` section.
    spec: its library spec.
    model: the model the loss calls (`lmjax.peft.PeftModel`).
    init_params: `key -> boxed trainable tree` (`Trainer(init_params=...)`): the fresh adapter,
      and zeros for each `train_also` subtree (give their real start with `trainable_value`).
    abstract: the frozen base's boxed abstract tree (NF4 `QArray`s for QLoRA).
    train_also: top-level base subtrees that train in full beside the adapter.
  """

  config: PEFTConfig
  spec: peft.Spec
  model: peft.PeftModel
  init_params: Callable[[jax.Array], Any]
  abstract: Any
  train_also: tuple[str, ...] = ()

  @property
  def frozen(self) -> Frozen:
    """The base as `train.trainer.Frozen(abstract, combine)`; the loss gets the `Adapted`."""
    return Frozen(self.abstract, self.combine)

  def combine(self, trainable: Any, frozen: Any) -> peft.Adapted:
    """The base with the adapter: `Adapted(frozen base + train_also subtrees, adapter)`."""
    trainable = dict(trainable)
    extra = {k: trainable.pop(k) for k in self.train_also}
    return peft.adapt({**frozen, **extra}, trainable, self.spec)

  @staticmethod
  def reference(adapted: peft.Adapted) -> peft.Adapted:
    """The base without the adapter, from the same arrays (`lmjax.peft.base_only`)."""
    return peft.base_only(adapted)

  def frozen_with(self, fn: Callable[[peft.Adapted, peft.Adapted], Any]) -> Frozen:
    """`Frozen` whose combine gives the loss `fn(policy, reference)`: the policy is the base
    with the adapter, the reference the base alone (held once)."""
    def combine(trainable, frozen):
      policy = self.combine(trainable, frozen)
      return fn(policy, peft.base_only(policy))
    return Frozen(self.abstract, combine)

  def frozen_value(self, base_params: Any) -> Any:
    """The frozen tree from the base's params (`train_also` left out; NF4 for QLoRA)."""
    base_params = {k: v for k, v in nn.meta.unbox(base_params).items()
                   if k not in self.train_also}
    if self.config.base_quant == "nf4":
      return qlora.quantize_base(base_params, self.model.config, **self.config.nf4_options())
    return base_params

  def trainable_value(self, adapter: Any, base_params: Any) -> dict:
    """The trainable start: the adapter with the `train_also` subtrees of `base_params` (for
    `job.state_from_params`)."""
    base_params = nn.meta.unbox(base_params)
    return {**nn.meta.unbox(adapter), **{k: base_params[k] for k in self.train_also}}

  def adapted(self, adapter: Any, frozen: Any) -> peft.Adapted:
    """The base with the trained adapter (what `generate` and `peft.apply` take)."""
    return self.combine(adapter, frozen)

  def save(self, workdir, model_config, adapter: Any, *, base: str,
           to_hf: Callable[[dict], dict] | None = None, task_type: str = "CAUSAL_LM") -> None:
    """Writes `workdir/adapter/` (Hugging Face PEFT format; gathered to the host first).
    `to_hf` maps the `train_also` subtrees to Hugging Face tensors saved as PEFT's
    `modules_to_save` (a reward model's `{"score": [D, 1]} -> {"score.weight": [1, D]}`)."""
    from train.report import gather_params

    host = gather_params(dict(adapter))  # every process takes part in the gather
    extra = {k: host.pop(k) for k in self.train_also}
    if extra and to_hf is None:
      raise ValueError(f"train_also {sorted(extra)} need to_hf to be saved")
    if jax.process_index() == 0:
      runs.save_run_adapter(workdir, model_config, host, self.spec, base=base,
                            base_quant=self.config.base_quant, nf4=self.config.nf4_options(),
                            task_type=task_type,
                            modules_to_save=to_hf(extra) if extra else None)


def setup(config: PEFTConfig, model: nn.Module, base_boxed: Any, *,
          train_also: Sequence[str] = (), prompt_init: jax.Array | None = None
          ) -> PeftSetup | None:
  """A job's PEFT pieces, or None when `config.method == "none"`.

  Args:
    config: the run config's `peft` section.
    model: the base model (`lmjax.CausalLM`, `lmjax.RewardModel`, ...).
    base_boxed: the base's boxed abstract params (`nn.Partitioned` leaves), e.g.
      `jax.eval_shape(lambda: model.init(key, *inputs)["params"])`.
    train_also: top-level subtrees of the base that train in full beside the adapter (a
      reward model's fresh `score` head); they leave the frozen tree.
    prompt_init: a soft prompt's starting value `[k, D]` (`prompt_from_text`); default random.

  Returns:
    `PeftSetup`: `model`, `init_params`, `frozen` (with `combine`), `reference`, ...

  Raises:
    ValueError: a target that matches nothing, a rank above a projection's width, a
      `train_also` name the base lacks (checked here, abstractly, before any weight is read).
  """
  if not config.enabled:
    return None
  spec = config.spec()
  cfg = model.config
  train_also = tuple(train_also)
  missing = [k for k in train_also if k not in base_boxed]
  if missing:
    raise ValueError(f"train_also {missing} are not top-level params of the base; it has "
                     f"{sorted(base_boxed)}")
  frozen_boxed = {k: v for k, v in base_boxed.items() if k not in train_also}
  if not isinstance(spec, peft.PromptConfig):  # targets and ranks checked now, abstractly
    jax.eval_shape(lambda: peft.init(spec, cfg, jax.random.key(0), boxed=frozen_boxed))

  def init_params(key):
    if isinstance(spec, peft.PromptConfig) and prompt_init is not None:
      adapter = {"embed": {"prompt_embeddings": nn.LogicallyPartitioned(
          jnp.asarray(prompt_init, jnp.float32), (None, "embed"))}}
    else:
      adapter = peft.init(spec, cfg, key, boxed=frozen_boxed)
    extra = jax.tree.map(lambda b: b.replace_boxed(jnp.zeros(b.value.shape, b.value.dtype)),
                         {k: base_boxed[k] for k in train_also},
                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {**adapter, **extra}

  abstract = frozen_boxed
  if config.base_quant == "nf4":
    abstract = qlora.abstract(frozen_boxed, cfg, **config.nf4_options())
  return PeftSetup(config, spec, peft.PeftModel(model), init_params, abstract, train_also)


def prompt_from_text(embedding: Any, ids: Sequence[int], k: int) -> jax.Array:
  """A soft prompt `[k, D]` starting as the embeddings of token `ids` (repeated, cut to k)."""
  spec = peft.PromptConfig(num_virtual_tokens=k, init_text="(text)")
  emb = jnp.asarray(embedding)
  tree = peft.prompt.init(spec, _Dims(emb.shape[1]), jax.random.key(0), embedding=emb,
                          text_ids=list(ids))
  return nn.meta.unbox(tree)["embed"]["prompt_embeddings"]


@dataclasses.dataclass(frozen=True)
class _Dims:
  model_dim: int
