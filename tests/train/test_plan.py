"""The memory plan: its state bytes equal what a sharded trainer holds on a device (8 CPU
devices, several mesh shapes), and the command line refuses a run that cannot fit."""

import jax
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import tiny
from train import plan as plan_lib
from train.config import OptimizerConfig
from train.objectives import causal_lm_loss
from train.optimizer import make_optimizer
from train.trainer import Trainer


def _on_device(tree, dev) -> int:
  """Bytes of `tree`'s shards that live on `dev` (measured on the arrays themselves)."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


@pytest.mark.parametrize("sizes", [(2, 2, 2, 1), (1, 8, 1, 1), (1, 2, 4, 1), (1, 2, 1, 4)])
def test_state_bytes_equal_a_sharded_trainer(sizes):
  cfg = tiny(vocab_size=256, model_dim=64, num_heads=8, num_kv_heads=4, ffn_dim=128)
  mesh = lmjax.make_mesh(*sizes)
  trainer = Trainer(lmjax.CausalLM(cfg), causal_lm_loss, make_optimizer(OptimizerConfig(), 10),
                    mesh, init_inputs=lmjax.counting.example_inputs(cfg), global_batch=8)
  state = trainer.init_state()
  dev = jax.devices()[0]
  params, opt = _on_device(state.params, dev), _on_device(state.opt_state, dev)
  full = 4 * lmjax.count_params(cfg)
  assert params < full  # really sharded
  got = plan_lib.plan(cfg, mesh=dict(zip(("data", "fsdp", "tensor", "sequence"), sizes)),
                      global_batch=8, seq_len=16)
  assert got.params == params
  assert 0 <= opt - got.optimizer <= 16  # AdamW's step counters are the rest.
  exact = plan_lib.plan_trainer(trainer, cfg, seq_len=16)
  assert (exact.params, exact.optimizer) == (params, opt)
  assert got.micro_batch == 8 // (sizes[0] * sizes[1])


def test_activation_estimate_follows_the_remat_policy():
  cfg = lmjax.TransformerConfig.from_preset("llama3.2-1b")
  none = plan_lib.activation_bytes(cfg, 1, 2048, 1)
  full = plan_lib.activation_bytes(cfg.replace(remat_policy="full"), 1, 2048, 1)
  flash = plan_lib.activation_bytes(cfg.replace(attention="flash"), 1, 2048, 1)
  # Without remat every layer keeps its T x T float32 probabilities: 16 x 32 heads x 2048^2 x 4.
  assert none > 16 * 32 * 2048**2 * 4 > flash
  # Full remat keeps one [T, D] input a layer plus one layer being recomputed.
  assert full < none / 8
  assert plan_lib.activation_bytes(cfg, 2, 2048, 1) == 2 * none


def test_the_command_refuses_what_cannot_fit_and_says_what_to_change(capsys):
  assert plan_lib.main(["--config", "llama3.1-70b", "--devices", "v5e-256"]) == 1
  out = capsys.readouterr().out
  assert "DOES NOT FIT in 16.00 GiB" in out and "to fit, try:" in out
  assert "70,553,706,496 params" in out
  assert plan_lib.main(["--config", "llama3.1-8b", "--devices", "v5p-128"]) == 0
  out = capsys.readouterr().out
  assert "fits in 95.00 GiB" in out
  # fsdp over the 64 chips of a v5p-128: float32 params in 64 shards.
  params = float(out.split("params")[2].split("GiB")[0]) * 2**30
  assert params == pytest.approx(4 * 8_030_261_248 / 64, rel=0.01)
  assert plan_lib.main(["--config", "demo", "--devices", "v9-8"]) == 2
  assert "unknown device 'v9-8'" in capsys.readouterr().err
  assert plan_lib.main(["--config", "llama3.1-8b", "--devices", "h100x8",
                        "--set", "mesh.data=-1", "mesh.fsdp=3"]) == 2
  assert "does not divide 8 devices" in capsys.readouterr().err


def test_rows_that_do_not_split_are_refused():
  with pytest.raises(ValueError, match="multiple of 8"):
    plan_lib.plan(tiny(), mesh={"data": 2, "fsdp": 4, "tensor": 1}, global_batch=4,
                  seq_len=8)
  assert plan_lib.DEVICES["v5p-128"].devices == 64  # v5p names count TensorCores, 2 a chip.
  assert np.isclose(plan_lib.DEVICES["h100x8"].bytes_per_device, 80e9)


def test_a_plan_over_the_device_memory_is_refused_with_what_to_change():
  cfg = lmjax.TransformerConfig.from_preset("llama3.2-1b", max_len=4096)
  p = plan_lib.plan(cfg, mesh={"data": 1, "fsdp": 8, "tensor": 1}, global_batch=16,
                    seq_len=4096, target=plan_lib.DEVICES["v5e-8"])
  assert p.fits is False
  with pytest.raises(ValueError, match=r"needs about .* GiB a device .*model.remat_policy=full"):
    plan_lib.check_fits(p, cfg, 8)
  ok = plan_lib.plan(cfg.replace(remat_policy="full", attention="flash"),
                     mesh={"data": 1, "fsdp": 8, "tensor": 1}, global_batch=8, seq_len=4096,
                     target=plan_lib.DEVICES["v5e-8"])
  assert ok.fits
  plan_lib.check_fits(ok, cfg, 8)


def test_the_sequence_axis_divides_activations_and_logits():
  cfg = lmjax.TransformerConfig.from_preset("llama3.2-1b", attention="flash")
  mesh = {"data": 1, "fsdp": 2, "tensor": 1}
  one = plan_lib.plan(cfg, mesh={**mesh, "sequence": 1}, global_batch=2, seq_len=8192)
  four = plan_lib.plan(cfg, mesh={**mesh, "sequence": 4}, global_batch=2, seq_len=8192)
  # float32 logits and their gradient of 8192 / 4 tokens of a 128256 vocabulary.
  assert four.logits == 2 * 2048 * 128256 * 4 == one.logits / 4
  # Activations: a quarter of the tokens, plus the gathered keys and values of the whole row
  # (16 layers x 2 x 8192 tokens x 8 kv heads x 64 x 4 bytes).
  gathered = 16 * 2 * 8192 * 8 * 64 * 4
  assert four.activations == pytest.approx(one.activations / 4 + gathered, rel=0.01)
  assert "1 row(s) x 2048 of 8192 tokens" in four.table()
  assert four.params < one.params  # the state splits over sequence too (fsdp x sequence)
  with pytest.raises(ValueError, match="make data.seq_len a multiple of 4"):
    plan_lib.plan(cfg, mesh={**mesh, "sequence": 4}, global_batch=2, seq_len=8190)


def test_the_command_suggests_and_plans_context_parallelism(capsys):
  long = ["--config", "llama3.1-8b-64k", "--devices", "v5p-128", "--set"]
  assert plan_lib.main([*long, "train.grad_accum=2"]) == 1
  assert "mesh.sequence=2 with mesh.fsdp (or mesh.data) halved" in capsys.readouterr().out
  assert plan_lib.main([*long, "mesh.fsdp=16", "mesh.sequence=4", "train.grad_accum=8"]) == 0
  out = capsys.readouterr().out
  assert "'sequence': 4" in out and "1 row(s) x 16384 of 65536 tokens" in out
