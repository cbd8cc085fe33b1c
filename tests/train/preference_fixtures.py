"""Shared pieces of the preference tests: tiny bases saved as Hugging Face folders (a
byte-level BPE tokenizer, or SmolLM2's real one with a tiny random trunk), and run configs."""

import jax
import jax.numpy as jnp

import lmjax
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params
from train import sft

TINY_RUN = ["train.log_every=1", "train.progress_bar=false", "train.eval_batches=0",
            "optimizer.warmup_steps=1", "optimizer.decay_steps=50", "optimizer.weight_decay=0.0",
            "checkpoint.every=0", "checkpoint.async_save=false", "mesh.data=1"]


def save_base(folder, tokenizer=None, **overrides):
  """A tiny random Llama-layout model as a Hugging Face folder."""
  cfg = fx.tiny_config(**{"max_len": 256, **overrides})
  params = random_params(lmjax.CausalLM(cfg), (jnp.ones((1, 4), jnp.int32),), 0)
  params = jax.tree.map(lambda x: x * 0.5, params)
  tok = fx.byte_level_tokenizer() if tokenizer is None else tokenizer
  return lmjax.save_pretrained(cfg, params, tok, folder)


def config(job, base, source, *sets):
  """A tiny run config of `job` (`train.reward.JOB` or `train.dpo.JOB`)."""
  preset = job.presets["demo"]()
  return sft.resolve_model(preset, [f"base={base}", f"data.source={source}", *TINY_RUN, *sets])
