"""A test-sized verifiable RL task: a character tokenizer over 16 symbols, prompt rows in a jsonl
file, a tiny CausalLM as the policy, and a reward that counts the letter "a"."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp

import lmjax
from train import config as config_lib
from train.rl_config import RLAlgoConfig, RLConfig, RLDataConfig

CHARS = "abcdefghijklm"  # ids 3.. ; 0 pad, 1 bos, 2 eos


class CharTokenizer:
  """Characters to ids (0 pad, 1 BOS, 2 EOS)."""

  vocab_size, pad_id, bos_id, eos_id, unk_id, mask_id = 16, 0, 1, 2, 0, None

  def encode(self, text):
    return [3 + CHARS.index(c) for c in text]

  def decode(self, ids):
    return "".join(CHARS[i - 3] for i in ids if 3 <= i < 3 + len(CHARS))


def count_a(prompts, completions, **_):
  """The share of "a" in each completion (0 for an empty one)."""
  return [c.count("a") / 8 for c in completions]


def tiny_model_config():
  return lmjax.TransformerConfig(vocab_size=16, model_dim=32, num_heads=2, num_kv_heads=2,
                                 ffn_dim=64, num_decoder_layers=1, max_len=32,
                                 activation="swiglu", norm="rmsnorm", position="rotary",
                                 use_bias=False)


def rows_file(tmp_path, n=16):
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": CHARS[i % 5 + 2:i % 5 + 5]}) + "\n"
                          for i in range(n)))
  return path


def tiny_config(tmp_path, algorithm="grpo", steps=6, **rl):
  rl = {"num_generations": 4, "max_new_tokens": 8, "max_prompt_len": 8, "beta": 0.0, **rl}
  return RLConfig(
      policy="tiny", reward="python:tests.train.rl_util:count_a",
      rl=RLAlgoConfig(algorithm=algorithm, **rl),
      data=RLDataConfig(source=f"jsonl:{rows_file(tmp_path)}", prompts_per_step=4,
                        heldout_prompts=0, heldout_fraction=0.0, chat_template=False),
      model=tiny_model_config(),
      optimizer=config_lib.OptimizerConfig(learning_rate=3e-2, warmup_steps=0,
                                           weight_decay=0.0, final_lr_fraction=1.0),
      checkpoint=config_lib.CheckpointConfig(every=0, keep=2, keep_best=False,
                                             async_save=False),
      train=config_lib.TrainConfig(steps=steps, eval_every=0, log_every=1, progress_bar=False),
      mesh=config_lib.MeshConfig(data=1))


def load_tiny(config, mesh, seed=0):
  """`(params, tokenizer)` of the tiny policy (the `load_policy` hook of `train.rl.run`)."""
  model = lmjax.CausalLM(config.model)
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(
      jax.random.key(seed))  # one compile, not one per initializer
  return params, CharTokenizer()
