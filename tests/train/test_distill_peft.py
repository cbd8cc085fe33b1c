"""`train.distill` with a `peft` section: the student trains a LoRA adapter on its frozen
pretrained weights beside the frozen teacher. Checked against float64 recomputes: the KD loss at
step 0 (B = 0) is the base student's, after training it is the loss of the merged weights
(merged here by hand, W + (alpha / r) A B); only the adapter is in the train state; a finished
run writes Hugging Face PEFT files that `load_run` merges; `--method data` (cross entropy on
the teacher's answers) trains an adapter too."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import lmjax
from lmjax import checkpoint as layout
from lmjax.convert import safetensors_io
from tests.lmjax.helpers import random_params, tokens
from tests.train.test_distill import teacher  # noqa: F401
from tests.train.test_distill_losses import reference_jsd
from tests.train.trainer_util import data_dirs, train_losses  # noqa: F401
from train import distill, distill_peft, sft
from train import job as job_lib

RANK, ALPHA = 4, 8.0


@pytest.fixture(autouse=True)
def _session_caches(data_dirs):  # noqa: F811
  yield


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):  # noqa: F811
  """A pretrained one-layer student with the teacher's vocabulary and tokenizer."""
  t_cfg, _, tok = lmjax.load_pretrained(teacher)
  cfg = t_cfg.replace(num_decoder_layers=1, max_len=64)
  params = random_params(lmjax.CausalLM(cfg), (jnp.ones((1, 4), jnp.int32),), 11)
  return lmjax.save_pretrained(cfg, params, tok, tmp_path_factory.mktemp("student") / "s")


def _reference_loss(s_cfg, s_params, t_cfg, t_params, batch, kd) -> float:
  """alpha T^2 KL(teacher || student) + (1 - alpha) CE per loss token, float64 math on the
  logits of no-cache forwards of each model's plain params."""
  def logits(cfg, params):
    return np.asarray(lmjax.CausalLM(cfg).apply({"params": params}, batch["inputs"]), np.float64)
  zs, zt = logits(s_cfg, s_params), logits(t_cfg, t_params)
  div = reference_jsd(zs, zt, kd.beta, kd.temperature)
  zs = zs - zs.max(-1, keepdims=True)
  lq = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
  ce = -np.take_along_axis(lq, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  return float(((kd.alpha * div + (1 - kd.alpha) * ce) * mask).sum() / mask.sum())


def _merged(base, adapter, scale):
  """W + scale * A B in float64 for every adapted kernel (`lora_a [*in, r]`, `lora_b [r, *out]`),
  back in the base's dtype; every other weight as it is."""
  flat, ad = flatten_dict(base), flatten_dict(jax.device_get(adapter))
  for path in [p for p in ad if p[-1] == "lora_a"]:
    a, b = np.asarray(ad[path], np.float64), np.asarray(ad[path[:-1] + ("lora_b",)], np.float64)
    w = flat[path[:-1] + ("kernel",)]
    delta = np.tensordot(a, b, axes=([a.ndim - 1], [0]))
    flat[path[:-1] + ("kernel",)] = (np.asarray(w, np.float64) + scale * delta).astype(w.dtype)
  return unflatten_dict(flat)


def test_lora_student_trains_only_the_adapter_and_its_kd_loss_is_the_merged_models(
    teacher, student):  # noqa: F811
  config = distill.resolve_models(distill.PRESETS["demo"](), [
      f"teacher={teacher}", f"student={student}", "peft.method=lora", f"peft.rank={RANK}",
      f"peft.alpha={ALPHA}", "peft.targets=query,value", "kd.alpha=0.5", "kd.temperature=2.0",
      "data.seq_len=16", "data.batch_size=4", "mesh.data=1", "optimizer.learning_rate=3e-2",
      "optimizer.warmup_steps=0"])
  config = distill.JOB.prepare(config)
  trainer = job_lib.build_trainer(distill.JOB, config)
  trainer.set_frozen(distill.JOB.frozen_params(config, trainer))
  state = distill.JOB.initial_state(config, trainer)
  paths = flatten_dict(jax.device_get(state.params))
  assert paths and {p[-1] for p in paths} == {"lora_a", "lora_b"}  # the adapter alone
  assert {p[-2] for p in paths} == {"query", "value"}
  # The frozen tree holds the student's base and the teacher, unchanged.
  s_params, _ = sft.load_base(str(student), config.model, None)
  t_params, _ = sft.load_base(str(teacher), config.teacher_model, None)
  frozen = jax.device_get(trainer.frozen_params)
  jax.tree.map(np.testing.assert_array_equal, frozen, {"student": s_params, "teacher": t_params})
  seq = np.asarray(tokens(2, 4, 17)) % config.model.vocab_size
  batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:],
           "loss_mask": (np.arange(16) >= 4).astype(np.float32)[None].repeat(4, 0),
           "segment_ids": np.ones((4, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
  base_loss = _reference_loss(config.model, s_params, config.teacher_model, t_params, batch,
                              config.kd)
  state, m = trainer.train_step(state, 0, batch)  # Step 0: B = 0, the student is its base.
  np.testing.assert_allclose(float(m["loss_sum"] / m["tokens"]), base_loss, rtol=1e-5)
  for step in range(1, 6):
    state, m = trainer.train_step(state, step, batch)
  got = trainer.evaluate(state.params, iter([batch]), 1)["loss"]
  merged = _merged(s_params, state.params, ALPHA / RANK)
  want = _reference_loss(config.model, merged, config.teacher_model, t_params, batch, config.kd)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert want < base_loss - 0.05, (base_loss, want)  # the adapter learned
  # What on-policy rollouts sample: the base with the adapter, the merged model's logits.
  adapted = distill_peft.student_params(config, state.params, trainer.frozen_params)
  np.testing.assert_allclose(
      lmjax.peft.apply(lmjax.CausalLM(config.model), adapted, batch["inputs"]),
      lmjax.CausalLM(config.model).apply({"params": merged}, batch["inputs"]), atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen_params), frozen)


def test_data_distillation_with_lora_writes_a_peft_adapter_that_load_run_merges(
    teacher, student, tmp_path):  # noqa: F811
  wd = tmp_path / "run"
  assert distill.main([
      "--teacher", str(teacher), "--student", str(student), "--method", "data", "--workdir",
      str(wd), "--set", "peft.method=lora", f"peft.rank={RANK}", f"peft.alpha={ALPHA}",
      "peft.targets=query,value", "generate.prompts=chat", "generate.num_prompts=8",
      "generate.max_new_tokens=8", "generate.batch_size=8", "data.seq_len=48",
      "data.batch_size=4", "data.heldout_fraction=0.25", "train.steps=4", "train.log_every=1",
      "train.progress_bar=false", "optimizer.learning_rate=3e-2", "optimizer.warmup_steps=0",
      "checkpoint.every=0", "checkpoint.async_save=false", "mesh.data=1",
      f"report.real_text=jsonl:{wd}/synthetic.jsonl"]) == 0
  report = json.loads((wd / "report.json").read_text())
  v = report["validation"]
  assert v["loss"] == pytest.approx(v["ce"])  # plain cross entropy on the teacher's answers
  losses = train_losses(wd)
  assert losses[max(losses)] < losses[min(losses)]
  folder = wd / "adapter"
  meta = json.loads((folder / "adapter_config.json").read_text())
  assert meta["peft_type"] == "LORA" and meta["r"] == RANK
  assert meta["base_model_name_or_path"] == str(student)
  tensors = {k: np.asarray(t.load(), np.float64)
             for k, t in safetensors_io.open_file(folder / "adapter_model.safetensors").items()}
  assert report["peft"]["trainable_params"] == sum(t.size for t in tensors.values())
  cfg, merged, _ = layout.load_run(wd)
  base, _ = sft.load_base(str(student), cfg, None)
  mf, changed = flatten_dict(merged), 0
  for path, w in flatten_dict(base).items():
    if path[-1] == "kernel" and path[-2] in ("query", "value"):
      key = ("base_model.model.model.layers.0.self_attn."
             + {"query": "q_proj", "value": "v_proj"}[path[-2]])
      a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]  # [r, in] [out, r]
      want = np.asarray(w, np.float64) + ALPHA / RANK * (b @ a).T.reshape(w.shape)
      np.testing.assert_allclose(np.asarray(mf[path], np.float64), want, atol=1e-5)
      changed += int(np.abs(np.asarray(mf[path]) - np.asarray(w)).max() > 1e-6)
    else:
      np.testing.assert_array_equal(mf[path], w)  # the base, untouched
  assert changed > 0


def test_peft_needs_a_pretrained_student(teacher):  # noqa: F811
  with pytest.raises(ValueError, match="new model"):
    distill.check_method(distill.resolve_models(distill.PRESETS["demo"](), [
        f"teacher={teacher}", "student=tiny", "peft.method=lora"]))
  with pytest.raises(ValueError, match="on-policy"):
    distill.check_method(distill.resolve_models(distill.PRESETS["demo"](), [
        f"teacher={teacher}", f"student={teacher}", "method=on-policy", "peft.method=prompt",
        "data.pack=false"]))
