"""`python -m train.sft` on a tiny pretrained-format base (a Hugging Face folder with a
byte-level BPE tokenizer and a chat template): packing, gradient accumulation, memorization,
resume, export, and bad input."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from lmjax import checkpoint as layout
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params
from tests.train.trainer_util import data_dirs, metrics  # noqa: F401
from train import chat_data, objectives, sft

PAIRS = [("the cat", "sat on the mat"), ("the dog", "ate the bone"),
         ("hello", "world"), ("the mat", "the cat sat")]


def _rows(pairs):
  return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
           "id": i} for i, (q, a) in enumerate(pairs)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny Llama-layout model saved as a Hugging Face folder, with tokenizer and template."""
  cfg = fx.tiny_config()
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 4), jnp.int32),), 0)
  params = jax.tree.map(lambda x: x * 0.5, params)
  return lmjax.save_pretrained(cfg, params, fx.byte_level_tokenizer(),
                               tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("sft_data") / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _rows(PAIRS * 4)))
  return path


@pytest.fixture(autouse=True)
def _session_caches(data_dirs):  # noqa: F811  (a fresh compilation and peak-FLOP/s cache)
  yield


def config(base, data, *sets):
  tiny = ["data.seq_len=32", "data.batch_size=8", "data.num_packing_bins=4",
          "data.heldout_fraction=0.25", "train.steps=4", "train.log_every=1",
          "train.progress_bar=false", "train.eval_batches=0", "optimizer.learning_rate=1e-2",
          "optimizer.warmup_steps=1", "optimizer.decay_steps=50", "checkpoint.every=0",
          "checkpoint.async_save=false", "report.replies=1", "report.max_new_tokens=4",
          "mesh.data=1"]
  return sft.resolve_model(sft.PRESETS["demo"](),
                           [f"base={base}", f"data.source=jsonl:{data}", *tiny, *sets])


def test_config_reads_the_base_and_refuses_shape_changes(base, data):
  c = config(base, data, "model.dropout_rate=0.1")
  assert c.model.model_dim == fx.TINY["model_dim"] and c.model.dropout_rate == 0.1
  with pytest.raises(ValueError, match="keeps the base model's shape"):
    config(base, data, "model.num_heads=2")
  with pytest.raises(ValueError, match="unknown config key 'data.sequence_len'"):
    config(base, data, "data.sequence_len=8")


def _loss_sums(model, params, batch):
  loss_sum, n, _ = objectives.causal_lm_loss(model, params, {
      k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0), False)
  return float(loss_sum), float(n)


def test_packed_loss_is_the_sum_of_the_examples_alone(base, data):
  c = config(base, data, "data.batch_size=2", "data.seq_len=64")
  tok = sft.base_tokenizer(str(base))
  params, _ = sft.load_base(str(base), c.model, None)
  model = lmjax.CausalLM(c.model)
  examples, _ = chat_data.encode_rows(
      [chat_data.Row(r, str(i)) for i, r in enumerate(_rows(PAIRS))], tok, 64)
  packed = list(sft.make_batches(c, tok, "heldout", examples))
  assert max(int(b["segment_ids"].max()) for b in packed) > 1  # rows do hold several examples
  got = np.sum([_loss_sums(model, params, b) for b in packed], axis=0)
  alone = np.sum([_loss_sums(model, params, chat_data.pad_examples([e], 64)) for e in examples],
                 axis=0)
  assert got[1] == alone[1] == sum(e["loss_mask"].sum() for e in examples)
  np.testing.assert_allclose(got[0], alone[0], rtol=1e-5)


def test_grad_accum_gives_the_batch_trajectory(base, data, tmp_path):
  losses = {}
  for k in (1, 8):
    c = config(base, data, f"train.grad_accum={k}", "data.pack=false", "report.replies=0")
    sft.run(c, tmp_path / f"ga{k}")
    losses[k] = [m["loss"] for m in metrics(tmp_path / f"ga{k}") if "loss" in m and
                 m.get("split") != "validation"]
  assert len(losses[1]) == 4
  np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)
  assert losses[1][-1] < losses[1][0]


def test_a_few_steps_reproduce_a_held_in_response_and_resume_bitwise(base, data, tmp_path):
  task = tmp_path / "task.jsonl"  # a user's multiple-choice task, scored at each evaluation
  task.write_text("".join(json.dumps({"prompt": q, "choices": [a, b], "answer": 0}) + "\n"
                          for (q, a), (_, b) in zip(PAIRS, PAIRS[1:] + PAIRS[:1])))
  c = config(base, data, "train.steps=40", "checkpoint.every=20", f"eval.tasks=jsonl:{task}")
  whole = sft.run(c, tmp_path / "whole")
  cfg, params, tok = layout.load_run(tmp_path / "whole")
  from train import evaluate

  logged = [r for r in metrics(tmp_path / "whole") if r.get("split") == "validation"]
  want = evaluate.run_tasks(lmjax.CausalLM(cfg), params, tok, [f"jsonl:{task}"])
  assert want and all(logged[-1][k] == pytest.approx(v, abs=1e-6) for k, v in want.items())
  assert type(tok).__name__ == "HFTokenizer" and tok.chat_template == fx.CHAT_TEMPLATE
  prompt = infer.prompts.render_chat([{"role": "user", "content": "the dog"}], tok)
  out = infer.generate(lmjax.CausalLM(cfg), params, [prompt], tokenizer=tok,
                       max_new_tokens=8, sampler=infer.sampling.Greedy())
  assert out.text[0].strip() == "ate the bone" and out.stop_reason == ["eos"]
  assert whole["validation"]["loss"] < whole["before"]["heldout"]["loss"]
  # Stopped at step 20 (as a preemption would), then resumed: the same params, bitwise.
  sft.run(config(base, data, "train.steps=20", "checkpoint.every=20"), tmp_path / "halves")
  sft.run(c, tmp_path / "halves")
  _, resumed, _ = layout.load_run(tmp_path / "halves")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Export: a Hugging Face folder that loads back with equal logits and the chat template.
  folder = lmjax.save_pretrained(cfg, params, tok, tmp_path / "export")
  cfg2, params2, tok2 = lmjax.load_pretrained(folder)
  ids = jnp.asarray([tok.encode(prompt)])
  np.testing.assert_allclose(lmjax.CausalLM(cfg2).apply({"params": params2}, ids),
                             lmjax.CausalLM(cfg).apply({"params": params}, ids), atol=1e-6)
  assert tok2.apply_chat_template([{"role": "user", "content": "x"}]) == (
      tok.apply_chat_template([{"role": "user", "content": "x"}]))
  if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                               attn_implementation="eager")
    with torch.no_grad():
      want = ref(torch.tensor(np.asarray(ids))).logits.numpy()
    got = np.asarray(lmjax.CausalLM(cfg).apply({"params": params}, ids))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_bad_rows_and_bases_fail_before_training(base, data, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(_rows(PAIRS)[0]) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
  with pytest.raises(chat_data.DataError, match=f"{bad}:2: a row needs one of the formats"):
    sft.run(config(base, bad, "data.heldout_fraction=0"), tmp_path / "w1")
  assert not layout.saved_steps(tmp_path / "w1")
  assert not (tmp_path / "w1" / "config.json").exists()
  bare = tmp_path / "bare"  # weights and config, no tokenizer files
  cfg = fx.tiny_config()
  lmjax.save_pretrained(cfg, random_params(lmjax.CausalLM(cfg), (jnp.ones((1, 4), jnp.int32),),
                                           1), None, bare)
  with pytest.raises(ValueError, match="has no tokenizer"):
    sft.run(config(bare, data), tmp_path / "w2")
  assert sft.main(["--model", str(base), "--data", "csv:x", "--workdir",
                   str(tmp_path / "w3"), "--set", "data.seq_len=32"]) == 2
  assert "use 'chat' (the embedded chat set), 'jsonl:PATH' or 'tfds:NAME'" in (
      capsys.readouterr().err)
  assert not (tmp_path / "w3").exists()
