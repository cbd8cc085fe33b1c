"""Shared pieces of the trainer tests: tiny run configs on the real Shakespeare corpus, with the
tfds data, the tokenizer cache and the peak-FLOP/s cache all in temporary folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import config as config_lib

REPO = Path(__file__).resolve().parents[2]

# Per objective: the preset it shrinks, and the model size overrides.
SHRINK = {
    "causal_lm": ("demo", ["model.num_decoder_layers=2"]),
    "masked_lm": ("bert-base", ["model.num_encoder_layers=2", "model.dropout_rate=0.0",
                                "model.attention_dropout_rate=0.0"]),
    "span_corruption": ("transformer-base", ["model.num_encoder_layers=1",
                                             "model.num_decoder_layers=1",
                                             "model.dropout_rate=0.0"]),
}


_JAX_CACHE = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory):
  """(tfds data dir, tokenizer cache dir), shared by the session: prepared on first use.

  Also a compilation cache for the session's subprocess jobs (fresh, in tmp; the env vars):
  they compile the same tiny steps many times. Not in this process: JAX's cache write
  segfaulted a test worker twice (in `put_executable_and_time`), taking its tests with it.
  """
  root = tmp_path_factory.mktemp("trainer_data")
  values = (str(root / "jax_cache"), 0, 0)
  saved_env = {k: os.environ.get(k) for k in ("LMJAX_PEAK_CACHE", *map(str.upper, _JAX_CACHE))}
  os.environ["LMJAX_PEAK_CACHE"] = str(root / "peak_flops.json")
  for k, v in zip(_JAX_CACHE, values):
    os.environ[k.upper()] = str(v)
  yield root / "tfds", root / "tokenizers"
  for k, v in saved_env.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def tiny_sets(data_dirs, objective: str = "causal_lm", *, steps: int = 4, seq: int = 32,
              batch: int = 8, extra=()) -> list[str]:
  """`--set` overrides shrinking the objective's preset to a tiny run on local data."""
  tfds_dir, tok_dir = data_dirs
  preset, model = SHRINK[objective]
  return [
      f"data.tfds_data_dir={tfds_dir}", f"data.tokenizer_cache_dir={tok_dir}",
      "data.source=shakespeare", "data.tokenizer.vocab_size=512",
      "data.tokenizer.num_sentinels=16", "data.tokenizer.max_corpus_chars=300000",
      f"data.seq_len={seq}", f"data.batch_size={batch}", "data.num_packing_bins=4",
      "model.vocab_size=512", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=2",
      "model.ffn_dim=64", f"model.max_len={seq}", *model,
      f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
      "train.progress_bar=false", "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=2",
      "optimizer.decay_steps=12",  # The step compiles the same whatever train.steps is.
      "checkpoint.every=0", "report.unigram_baseline=false", "report.prompts=[]",
      "mesh.data=1", *extra]


def tiny_config(data_dirs, objective: str = "causal_lm", **kw) -> config_lib.RunConfig:
  preset, _ = SHRINK[objective]
  return config_lib.apply_overrides(config_lib.preset(preset),
                                    tiny_sets(data_dirs, objective, **kw))


def run_cli(args, *, env=None, timeout=300, script=None) -> subprocess.CompletedProcess:
  """`python -m train.pretrain ARGS` (or `python -c SCRIPT ARGS`) in a subprocess."""
  full_env = {**os.environ, **(env or {})}
  cmd = [sys.executable, "-c", script, *args] if script else [
      sys.executable, "-m", "train.pretrain", *args]
  return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                        timeout=timeout)


def metrics(workdir) -> list[dict]:
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def train_losses(workdir) -> dict[int, float]:
  return {m["step"]: m["loss"] for m in metrics(workdir)
          if "loss" in m and m.get("split") != "validation"}
