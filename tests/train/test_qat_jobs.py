"""`--set quant.qat=...` in the training jobs (`train.qat`): the trainer's training and
evaluation steps read the weights `lmjax.quant.quantize` serves (reference: the float loss of
the quantized-then-dequantized params, computed outside the trainer), the gradient is the
straight-through one (the float gradient at those weights), a reference/teacher beside the
trained model stays float (RL: rollouts and loss read the served policy, the KL reference is
float), a run trains, reports and resumes, bad settings fail before work."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import quant
from tests.train.trainer_util import data_dirs, tiny_config, tiny_sets  # noqa: F401
from train import config as config_lib
from train import job as job_lib
from train import objectives, pretrain
from train.checkpointing import config_differences, section_defaults
from train.sft_config import PRESETS as SFT_PRESETS
from train.trainer import Frozen

QAT = ["quant.qat=int4", "quant.group_size=16"]


def _batch(cfg, rows: int = 8, seq: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "loss_mask": np.ones((rows, seq), np.float32),
          "segment_ids": np.ones((rows, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def _mean_loss(model, params, batch):
  def loss(p, b):
    s, n, _ = objectives.causal_lm_loss(model, p, b, jax.random.key(0), False)
    return s / n
  return jax.jit(loss)(params, batch)


def _served(model, params, group=16):
  """The reference: PTQ of `params`, dequantized (what `quant.apply` computes with)."""
  return jax.jit(lambda p: quant.dequantize_params(quant.quantize(model, p, "int4", group)))(
      params)


def test_steps_read_the_served_weights_with_a_straight_through_gradient(data_dirs):  # noqa: F811
  config = config_lib.apply_overrides(tiny_config(data_dirs), QAT)
  trainer = job_lib.build_trainer(pretrain.JOB, config)
  state = trainer.init_state()
  model, params = trainer.model, jax.device_get(state.params)
  batch = _batch(config.model)
  ref_loss = _mean_loss(model, _served(model, params), batch)
  float_loss = _mean_loss(model, params, batch)
  assert abs(float(ref_loss) - float(float_loss)) > 1e-4  # int4 changes the loss
  # Evaluation step: the served model's loss.
  got = trainer.evaluate(state.params, iter([batch]))["loss"]
  np.testing.assert_allclose(got, ref_loss, rtol=1e-6)
  # Training step: the same loss, and the gradient of the float loss at the served weights
  # (its norm: the trainer reports it before clipping).
  ref_grads = jax.jit(jax.grad(lambda p: objectives.causal_lm_loss(
      model, p, batch, jax.random.key(0), False)[0] / batch["loss_mask"].sum()))(
          _served(model, params))
  qat_grads = jax.jit(jax.grad(lambda p: trainer.loss_fn(
      model, p, batch, jax.random.key(0), False)[0] / batch["loss_mask"].sum()))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(qat_grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  for a, b in zip(jax.tree.leaves(qat_grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  _, metrics = trainer.train_step(state, 0, batch)
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(metrics["loss_sum"] / metrics["tokens"], ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(sum(
      np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(ref_grads))), rtol=1e-4)


def test_a_frozen_reference_or_teacher_stays_float(data_dirs):  # noqa: F811
  """A job with `Frozen` params (DPO's reference, distillation's teacher): only the trained
  params are fake-quantized; the frozen ones reach the loss as they are."""
  config = config_lib.apply_overrides(tiny_config(data_dirs), QAT)

  class PolicyAndReference(pretrain.Pretrain):
    def partition(self, config):
      model = lmjax.model_for(config.model)
      boxed = jax.eval_shape(lambda: model.init(
          jax.random.key(0), *lmjax.counting.example_inputs(config.model))["params"])
      return None, Frozen(boxed, lambda t, f: {"policy": t, "reference": f})

    def loss(self, config):
      def loss_fn(model, params, batch, rng, train):
        s, n, _ = objectives.causal_lm_loss(model, params["policy"], batch, rng, train)
        r, _, _ = objectives.causal_lm_loss(model, params["reference"], batch, rng, train)
        return s, n, {"reference": r}
      return loss_fn

  trainer = job_lib.build_trainer(PolicyAndReference(), config)
  state = trainer.init_state()
  model = trainer.model
  reference = jax.tree.map(lambda x: 1.1 * x, jax.device_get(state.params))
  trainer.set_frozen(reference)
  batch = _batch(config.model, seed=1)
  out = trainer.evaluate(state.params, iter([batch]))
  np.testing.assert_allclose(out["loss"], _mean_loss(
      model, _served(model, jax.device_get(state.params)), batch), rtol=1e-6)
  np.testing.assert_allclose(out["reference"], _mean_loss(model, reference, batch), rtol=1e-6)
  assert abs(out["reference"] - _mean_loss(model, _served(model, reference), batch)) > 1e-4


def test_a_qat_run_trains_reports_and_resumes(data_dirs, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "qat"
  sets = tiny_sets(data_dirs, steps=2, extra=QAT)
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets]) == 0
  out = capsys.readouterr().out
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["quant"] == {"qat": "int4", "group_size": 16, "embeddings": "true",
                            "head": "true"}
  report = json.loads((workdir / "report.json").read_text())
  # The validation figure is the served model's: PTQ of the run's final params, evaluated on
  # the same held-out batches by a float trainer.
  config = config_lib.apply_overrides(config_lib.preset("demo"), sets)
  float_config = dataclasses.replace(config, quant=config_lib.QuantConfig())
  float_trainer = job_lib.build_trainer(pretrain.JOB, float_config)
  _, params, tok = lmjax.checkpoint.load_run(workdir)
  model = float_trainer.model

  def evaluate(p):
    it = pretrain.JOB.eval_batches(config, tok)
    try:
      return float_trainer.evaluate(p, it, config.train.eval_batches)["loss"]
    finally:
      it.close()

  np.testing.assert_allclose(report["validation"]["loss"], evaluate(_served(model, params)),
                             rtol=1e-5)
  np.testing.assert_allclose(report["quant"]["validation_float"]["loss"], evaluate(params),
                             rtol=1e-5)
  assert report["quant"]["serve"].startswith("lmjax.quant.quantize(model, params, 'int4', "
                                             "group_size=16")
  assert "QAT int4: the validation figures above are the quantized model's" in out
  # Resume: one more step from the saved one, QAT still on.
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets, "train.steps=3"]) == 0
  assert "resuming from step 2" in capsys.readouterr().out
  assert lmjax.checkpoint.saved_steps(workdir)[-1] == 3
  # Another QAT format is another objective: refused, the checkpoint left alone.
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets, "train.steps=4",
                        "quant.qat=int8"]) == 1
  assert "quant.qat: saved 'int4', now 'int8'" in capsys.readouterr().err


def test_runs_saved_before_the_quant_section_resume_without_it(data_dirs):  # noqa: F811
  for config in (config_lib.preset("demo"), dataclasses.replace(
      SFT_PRESETS["demo"](), model=config_lib.preset("demo").model)):
    now = config.to_dict()
    older = {k: v for k, v in now.items() if k != "quant"}
    assert config_differences(older, now, section_defaults(config)) == ([], [])
    on = dataclasses.replace(config, quant=config_lib.QuantConfig(qat="int4"))
    blocking, _ = config_differences(older, on.to_dict(), section_defaults(on))
    assert blocking == ["quant.qat: saved '<absent>', now 'int4'"]


@pytest.mark.parametrize("item,message", [
    ("quant.qat=int3", "quant.qat='int3'; allowed: ('none', 'int8', 'int4', 'nf4')"),
    ("quant.group_size=0", "quant.group_size=0; allowed: an int >= 1, -1"),
    ("quant.embeddings=fp8", "quant.embeddings='fp8'; allowed: ('true', 'false', 'int8'"),
])
def test_bad_settings_are_refused_before_work(item, message, tmp_path, capsys):
  assert pretrain.main(["--workdir", str(tmp_path / "w"), "--set", item]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_group_size_and_peft_conflicts_fail_before_work(data_dirs, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "w"
  sets = tiny_sets(data_dirs, steps=2, extra=["quant.qat=int4", "quant.group_size=24"])
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets]) == 1
  err = capsys.readouterr().err
  assert "quant.group_size=24" in err and "does not divide" in err
  assert not (workdir / "config.json").exists()
  base = SFT_PRESETS["demo"]()
  with pytest.raises(ValueError, match="quant.qat='int4' with peft.method='lora'"):
    config_lib.apply_overrides(base, ["quant.qat=int4", "peft.method=lora"])


def test_rl_rolls_out_and_trains_the_served_policy_against_a_float_reference(tmp_path):
  from tests.train import rl_util
  from train import rl

  config = dataclasses.replace(rl_util.tiny_config(tmp_path, "grpo", steps=1, beta=0.1),
                               quant=config_lib.QuantConfig(qat="int8", group_size=16))
  loop = rl.Loop(config, tmp_path / "run")
  loop.setup(rl_util.load_tiny)
  base, _ = rl_util.load_tiny(config, None)
  p = jax.device_get(loop.params())
  model = lmjax.CausalLM(config.model)
  served = jax.device_get(jax.jit(lambda q: quant.dequantize_params(
      quant.quantize(model, q, "int8", 16)))(base))
  # The policy the rollouts sample from and the loss reads is the PTQ model; the reference
  # is the float one.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               p["policy"], served)
  jax.tree.map(np.testing.assert_array_equal, p["reference"], base)
  assert any(np.abs(np.asarray(a) - b).max() > 1e-5
             for a, b in zip(jax.tree.leaves(p["policy"]), jax.tree.leaves(base)))
