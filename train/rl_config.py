"""Run configs of `train.rl`: the algorithm (`rl.*`), the prompts (`data.*`), the presets.

`RLConfig.model` is the policy's `TransformerConfig`, read from the policy when the run is set
up (as SFT's base); only `train.sft_config.MODEL_MAY_CHANGE` fields of it may be set.
Defaults follow TRL / Tunix where they agree (clip 0.2, GRPO k3 KL, PPO k1 KL in the reward,
lambda 0.95, value coefficient 0.1).
"""

from __future__ import annotations

import dataclasses

from train import config as config_lib
from train import rl_algos
from train.overrides import check_types
from train.peft_config import PEFTConfig
from train.run_sections import FineTuneRun

ALGORITHMS = ("grpo", "rloo", "ppo")
EMBEDDED = ("arithmetic",)


@dataclasses.dataclass(frozen=True)
class RLAlgoConfig:
  """The algorithm and the rollouts.

  Attributes:
    algorithm: "grpo" | "rloo" | "ppo" (one loop; they differ by advantages and loss).
    num_generations: G samples per prompt (>= 2 for GRPO and RLOO: the group baseline).
    beta: KL coefficient toward the frozen reference (>= 0): GRPO/RLOO add beta * KL(k3 by
      default) to the loss; PPO subtracts beta * KL(k1) from the per-token reward.
    kl_estimator: "k1" | "k2" | "k3" (default: "k3" for GRPO/RLOO, "k1" for PPO).
    epsilon, epsilon_high: clip range of the per-token ratio (epsilon_high None: = epsilon).
    loss_aggregation: `train.rl_algos.AGGREGATIONS`.
    scale_rewards: GRPO: "group" | "batch" | "none" (std used to scale centred rewards).
    whiten_advantages: PPO: normalize the GAE advantages over the batch's tokens.
    gamma, lam: PPO's discount and GAE lambda.
    vf_coef, cliprange_value: PPO value-loss weight and clip.
    updates_per_rollout: optimizer steps per rollout: epochs x minibatches (PPO: several;
      GRPO/RLOO: 1, then the ratio is exactly 1 and the old log-probs are not recomputed).
    num_minibatches: minibatches per epoch (each an optimizer step).
    temperature, top_p: the rollout sampler; the learner scores logits / temperature.
    max_new_tokens: completion budget; max_prompt_len: prompt budget (longer is an error).
  """

  algorithm: str = "grpo"
  num_generations: int = 4
  beta: float = 0.04
  kl_estimator: str | None = None
  epsilon: float = 0.2
  epsilon_high: float | None = None
  loss_aggregation: str = "sequence-mean"
  scale_rewards: str = "group"
  whiten_advantages: bool = True
  gamma: float = 1.0
  lam: float = 0.95
  vf_coef: float = 0.1
  cliprange_value: float = 0.2
  updates_per_rollout: int = 1
  num_minibatches: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  max_new_tokens: int = 64
  max_prompt_len: int = 128

  def __post_init__(self):
    check_types(self)
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"rl.algorithm={self.algorithm!r}; allowed: {ALGORITHMS}")
    if self.algorithm in ("grpo", "rloo") and self.num_generations < 2:
      raise ValueError(f"rl.num_generations={self.num_generations}: {self.algorithm} needs "
                       ">= 2 samples per prompt (its baseline is the other samples of the group)")
    if self.num_generations < 1:
      raise ValueError(f"rl.num_generations={self.num_generations} must be >= 1")
    if not self.beta >= 0:
      raise ValueError(f"rl.beta={self.beta} must be >= 0 (0: no KL penalty)")
    if self.kl_estimator is not None and self.kl_estimator not in rl_algos.KL_ESTIMATORS:
      raise ValueError(f"rl.kl_estimator={self.kl_estimator!r}; allowed: "
                       f"{rl_algos.KL_ESTIMATORS}")
    if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
      raise ValueError(f"rl.epsilon={self.epsilon} must be in (0, 1) and rl.epsilon_high "
                       f"({self.epsilon_high}) > 0")
    if self.loss_aggregation not in rl_algos.AGGREGATIONS:
      raise ValueError(f"rl.loss_aggregation={self.loss_aggregation!r}; allowed: "
                       f"{rl_algos.AGGREGATIONS}")
    if self.scale_rewards not in rl_algos.REWARD_SCALES:
      raise ValueError(f"rl.scale_rewards={self.scale_rewards!r}; allowed: "
                       f"{rl_algos.REWARD_SCALES}")
    if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError(f"rl.gamma={self.gamma} and rl.lam={self.lam} must be in [0, 1]")
    if self.vf_coef < 0 or self.cliprange_value <= 0:
      raise ValueError("rl.vf_coef must be >= 0 and rl.cliprange_value > 0")
    if self.updates_per_rollout < 1 or self.num_minibatches < 1:
      raise ValueError("rl.updates_per_rollout and rl.num_minibatches must be >= 1")
    if self.updates_per_rollout % self.num_minibatches:
      raise ValueError(f"rl.updates_per_rollout={self.updates_per_rollout} must be a multiple "
                       f"of rl.num_minibatches={self.num_minibatches} (epochs x minibatches)")
    if self.temperature <= 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"rl.temperature={self.temperature} must be > 0 and rl.top_p="
                       f"{self.top_p} in (0, 1]")
    if self.max_new_tokens < 1 or self.max_prompt_len < 1:
      raise ValueError("rl.max_new_tokens and rl.max_prompt_len must be >= 1")

  @property
  def kl(self) -> str:
    """The KL estimator in use."""
    return self.kl_estimator or ("k1" if self.algorithm == "ppo" else "k3")

  @property
  def length(self) -> int:
    """Row width of a rollout: prompt budget + completion budget."""
    return self.max_prompt_len + self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
  """The prompts.

  Attributes:
    source: "arithmetic" (embedded, `train.arithmetic`), `jsonl:PATH` or `tfds:NAME` with
      prompt-only rows `{"prompt": str | [messages]}` (other fields go to the reward function).
    prompts_per_step: prompts of one rollout (rows = prompts x num_generations).
    heldout_prompts: held-out prompts scored greedily at each evaluation (0: none).
    heldout_fraction: of a jsonl file's rows, held out (by a hash of the row).
    chat_template: render prompts with the policy's chat template (text prompts as one user
      message); false: encode the prompt text as it is.
    system_prompt: a system message put before every chat prompt that has none (None: the
      template's default, e.g. SmolLM2's "You are a helpful AI assistant ...").
    seed: prompt order and the rollout seeds.
    arithmetic_max_steps, arithmetic_max_value: the embedded task's difficulty.
    arithmetic_few_shot: worked examples (train problems and their solutions, the same for
      every prompt) shown as earlier chat turns before each arithmetic question.
  """

  source: str = "arithmetic"
  prompts_per_step: int = 4
  heldout_prompts: int = 32
  heldout_fraction: float = 0.05
  chat_template: bool = True
  system_prompt: str | None = None
  seed: int = 0
  tfds_data_dir: str | None = None
  arithmetic_max_steps: int = 1
  arithmetic_max_value: int = 20
  arithmetic_few_shot: int = 0

  def __post_init__(self):
    check_types(self)
    if self.prompts_per_step < 1 or self.heldout_prompts < 0:
      raise ValueError("data.prompts_per_step must be >= 1 and data.heldout_prompts >= 0")
    kind, _, rest = self.source.partition(":")
    if self.source not in EMBEDDED and not (kind in ("jsonl", "tfds") and rest):
      raise ValueError(f"data.source={self.source!r}: use 'arithmetic' (embedded), "
                       "'jsonl:PATH' or 'tfds:NAME'")
    if not 0 <= self.heldout_fraction < 1:
      raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
    if self.arithmetic_few_shot < 0:
      raise ValueError(f"data.arithmetic_few_shot={self.arithmetic_few_shot} must be >= 0")
    if (self.system_prompt is not None or self.arithmetic_few_shot) and not self.chat_template:
      raise ValueError("data.system_prompt and data.arithmetic_few_shot are chat turns: they "
                       "need data.chat_template=true")


@dataclasses.dataclass(frozen=True)
class RLConfig(FineTuneRun):
  """An RL run: `policy` is trained against `reward`, KL-anchored to its own initial params.
  The `model`, `peft`, `optimizer`, `mesh`, `checkpoint` and `train` sections are
  `FineTuneRun`'s.

  `peft` (`train.peft_config`): train an adapter (LoRA, QLoRA, bottleneck adapters) on the
  frozen policy instead of every weight; the reference is then the base without the adapter,
  from the same arrays (no second copy of the model)."""

  MODEL_FIELD = "policy"
  MODEL_FLAG = "--policy"
  MODEL_KIND = "RL trains a decoder-only (CausalLM) policy"

  policy: str
  reward: str = "python:train.rl_arithmetic:correct,python:train.rl_arithmetic:formatted*0.1"
  rl: RLAlgoConfig = dataclasses.field(default_factory=RLAlgoConfig)
  data: RLDataConfig = dataclasses.field(default_factory=RLDataConfig)

  def __post_init__(self):
    super().__post_init__()
    if not self.reward:
      raise ValueError("reward (--reward) must be python:module:function or a reward-model "
                       "run dir")
    if self.peft.method == "prompt":
      raise ValueError("peft.method=prompt: soft prompts are not supported by train.rl (their "
                       "virtual tokens shift the rollout's positions); use peft.method=lora or "
                       "adapter")
    self.check_seq_len(self.rl.length, "rl.max_prompt_len + rl.max_new_tokens")

  @property
  def rows(self) -> int:
    """Rollout rows per step (prompts x generations)."""
    return self.data.prompts_per_step * self.rl.num_generations


def _demo() -> RLConfig:
  # SmolLM2-135M-Instruct on one-step arithmetic (numbers up to 20), sized for 2 CPU cores
  # shared with other jobs. One worked example before each question: the base model then
  # answers in the format and is right about half the time (greedy), so every step's groups
  # carry a reward signal; the samples (temperature 0.7) are short (~16 tokens). A LoRA adapter
  # on every projection trains (the reference is the base without it: one copy of the model,
  # no optimizer state for its weights), in micro-batches of 4 rows: ~2 GB of memory.
  return RLConfig(
      policy="smollm2-135m-instruct",
      rl=RLAlgoConfig(algorithm="grpo", num_generations=4, beta=0.04, max_new_tokens=32,
                      max_prompt_len=144, temperature=0.7),
      data=RLDataConfig(source="arithmetic", prompts_per_step=4, heldout_prompts=64,
                        arithmetic_max_steps=1, arithmetic_max_value=20, arithmetic_few_shot=1),
      peft=PEFTConfig(method="lora", rank=16, alpha=32.0,
                      targets=("query", "key", "value", "out", "wi_gate", "wi_up", "wo")),
      optimizer=config_lib.OptimizerConfig(learning_rate=2e-4, warmup_steps=2,
                                           weight_decay=0.0, final_lr_fraction=1.0),
      checkpoint=config_lib.CheckpointConfig(every=8, keep=2, keep_best=False),
      train=config_lib.TrainConfig(steps=24, grad_accum=4, eval_every=8, log_every=1,
                                   progress_bar=False))


PRESETS = {"demo": _demo}
