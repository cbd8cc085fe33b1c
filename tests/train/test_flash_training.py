"""`attention="flash"` trains: `python -m train.pretrain --set model.attention=flash` runs (train
registers the kernel itself), and a trainer built so runs the Pallas kernel (in the interpreter
on this CPU, in a `shard_map` over the mesh) with the reference attention's losses and
gradients."""

import itertools

import jax
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import find_eqns
from tests.train.trainer_util import (  # noqa: F401
  data_dirs,
  run_cli,
  tiny_config,
  tiny_sets,
  train_losses,
)
from train import data as data_lib
from train import pretrain
from train.trainer import attention_scope

STEPS = 3
FLASH = ["model.attention=flash"]


def _pallas_calls(jaxpr) -> int:
  """Pallas calls in a jaxpr, nested ones (scan, shard_map, custom_vjp, remat) included."""
  return len(find_eqns(jaxpr, ("pallas_call",), descend_into_found=False))


def _batches(config, n):
  tok = data_lib.build_tokenizer(config.data)
  return list(itertools.islice(data_lib.make_pipeline(config.data, tok, "train"), n))


def _train(config, data, mesh=None):
  """Losses, gradient norms and params after each step, and the jaxpr of the step."""
  trainer = pretrain.build_trainer(config, mesh)
  state = trainer.init_state()
  with jax.set_mesh(trainer.mesh), attention_scope(trainer.model)():
    jaxpr = trainer._step.trace(state, np.int32(0), trainer.place(data[0]), None).jaxpr
  out = {"loss": [], "grad_norm": [], "params": []}
  for i, batch in enumerate(data):
    state, m = trainer.train_step(state, i, batch)
    out["loss"].append(float(m["loss_sum"] / m["tokens"]))
    out["grad_norm"].append(float(m["grad_norm"]))
    out["params"].append(jax.device_get(state.params))
  return out, jaxpr


def _loss_and_grads(config, params, batch, mesh):
  """The loss of one batch and its gradient, traced as the trainer traces its model."""
  trainer = pretrain.build_trainer(config, mesh)
  placed = trainer.place(batch)

  def loss(p):
    loss_sum, n, _ = trainer.loss_fn(trainer.model, p, placed, jax.random.key(0), True)
    return loss_sum / n

  with jax.set_mesh(mesh), attention_scope(trainer.model)():
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


def test_flash_training_equals_the_reference_on_a_mesh(data_dirs):  # noqa: F811
  ref_config = tiny_config(data_dirs, steps=STEPS, seq=16)
  flash_config = tiny_config(data_dirs, steps=STEPS, seq=16, extra=FLASH)
  data = _batches(ref_config, STEPS)
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  ref, ref_jaxpr = _train(ref_config, data, mesh)
  got, flash_jaxpr = _train(flash_config, data, mesh)
  # The kernel runs (its forward, dq and dk/dv calls in each of the 2 layers), not the CPU
  # fallback to the reference.
  assert _pallas_calls(ref_jaxpr.jaxpr) == 0
  assert _pallas_calls(flash_jaxpr.jaxpr) == 3 * 2
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
  _close(got["params"], ref["params"])
  # The gradients themselves, leaf by leaf, at the trained params.
  want_loss, want = _loss_and_grads(ref_config, ref["params"][-1], data[0], mesh)
  got_loss, grads = _loss_and_grads(flash_config, ref["params"][-1], data[0], mesh)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  _close(grads, want)
  # The check has teeth: one step apart is far from equal.
  with pytest.raises(AssertionError):
    _close(got["params"][-1], ref["params"][-2])


CLI = """
import sys
assert "infer.flash_attention" not in sys.modules  # Nothing registered "flash" beforehand.
from train import pretrain
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_pretrain_command_trains_with_flash(data_dirs, tmp_path):  # noqa: F811
  """The command line of the issue: it failed building the trainer ("flash" not registered)."""
  sets = tiny_sets(data_dirs, steps=2, seq=16, extra=FLASH)
  out = run_cli(["--workdir", str(tmp_path), "--set", *sets], script=CLI)
  assert out.returncode == 0, out.stderr[-3000:]
  config = tiny_config(data_dirs, steps=2, seq=16)
  ref, _ = _train(config, _batches(config, 2))  # The reference attention, the same batches.
  got = train_losses(tmp_path)
  np.testing.assert_allclose([got[1], got[2]], ref["loss"], rtol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_flash_train_step_lowers_for_hardware_over_a_mesh(data_dirs, platform,  # noqa: F811
                                                          monkeypatch):
  """The compiled kernel, in a step sharded over 8 devices, lowers for a TPU and a GPU.

  Mosaic refuses a Pallas call that XLA would have to partition ("cannot be automatically
  partitioned"): this fails unless the kernel runs in a `shard_map` over the mesh.
  """
  from jax._src.pallas.mosaic import tpu_info  # private: pretend a TPU v5e for Mosaic's checks

  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5e")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu" if platform == "tpu" else "gpu")
  config = tiny_config(data_dirs, steps=STEPS, seq=16, extra=FLASH)
  trainer = pretrain.build_trainer(config, lmjax.make_mesh(data=2, fsdp=2, tensor=2))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
           for k, v in _batches(config, 1)[0].items()}
  with jax.set_mesh(trainer.mesh), attention_scope(trainer.model)():
    traced = trainer._step.trace(trainer.abstract_state, np.int32(0), batch, None)
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(f"custom_call @{target}") == 3 * 2  # fwd, dq and dk/dv in 2 layers
