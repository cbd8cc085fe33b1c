"""Quantization-aware training in every job: `--set quant.qat=int8|int4|nf4` (`QuantConfig`).

The trained model's params are fake-quantized before the loss reads them, in the training step
and in the evaluation step alike (`lmjax.quant.qat.fake_quant_params`: the forward reads
exactly the weights `lmjax.quant.quantize` serves, the backward is the straight-through
estimator, Bengio et al., 2013; Jacob et al., 2018). So the validation loss of a QAT run is the
served (PTQ of the trained weights) model's, and the optimizer updates float weights.

Only the trained model is quantized: the wrapper acts on the trainable params before the job's
`Frozen.combine` joins them to what is frozen, so a DPO/RL reference or a distillation teacher
stays float. A PEFT method beside QAT is refused when the config is made
(`train.run_sections.FineTuneRun`); QLoRA's quantized base is `peft.base_quant`.

    wrapped_loss, frozen = wrap(config.quant, model, loss, frozen)   # train.job.build_trainer
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from lmjax.quant.qat import fake_quant_params
from train.config import QuantConfig
from train.trainer import Frozen


def quantizer(quant: QuantConfig, model: nn.Module) -> Callable[[Any], Any]:
  """`params -> fake-quantized params` of `model` as `quant` asks."""
  kwargs = quant.quantize_args()
  group, embeddings, head = kwargs["group_size"], kwargs["embeddings"], kwargs["head"]

  def fq(params):
    return fake_quant_params(model, params, quant.qat, group, embeddings=embeddings, head=head)
  return fq


def wrap(quant: QuantConfig, model: nn.Module, loss_fn, frozen: Frozen | None):
  """`(loss_fn, frozen)` of a trainer whose trained params are fake-quantized (unchanged when
  `quant.qat` is "none").

  Args:
    quant: the run's quant section.
    model: the trained model (the trainer's); its params are the trainer's trainable params.
    loss_fn: the job's loss, `(model, params, batch, rng, train) -> (sum, count, sums)`.
    frozen: the job's `Frozen` (a reference, a teacher) or None.

  Returns:
    Without frozen params, a loss that reads the fake-quantized params; with them, the same
    loss and a `Frozen` whose `combine` joins the fake-quantized trainable params to the
    float frozen ones.
  """
  if not quant.enabled:
    return loss_fn, frozen
  fq = quantizer(quant, model)
  if frozen is not None:
    combine = frozen.combine
    return loss_fn, dataclasses.replace(frozen, combine=lambda t, f: combine(fq(t), f))

  def qat_loss(model, params, batch, rng, train):
    return loss_fn(model, fq(params), batch, rng, train)
  return qat_loss, None


def check(quant: QuantConfig, model: nn.Module, abstract_params: Any) -> None:
  """Raises the ValueError `lmjax.quant.quantize` would (a group size not dividing a weight,
  named) before any work: traced on the params' shapes only."""
  if quant.enabled:
    try:
      jax.eval_shape(quantizer(quant, model), abstract_params)
    except ValueError as e:
      raise ValueError(f"quant.qat={quant.qat!r} quant.group_size={quant.group_size}: {e}; "
                       "pick a group size dividing every weight's group axis (-1: the "
                       "format's default)") from None


def served_command(quant: QuantConfig, workdir) -> str:
  """How to serve the run quantized as it was trained."""
  default = QuantConfig(qat=quant.qat)
  if (quant.group_size, quant.embeddings, quant.head) == (default.group_size,
                                                           default.embeddings, default.head):
    return f"python -m infer --model {workdir} --quant {quant.qat}"
  args = ", ".join(f"{k}={v!r}" for k, v in quant.quantize_args().items())
  return (f"lmjax.quant.quantize(model, params, {quant.qat!r}, {args}) on the params of "
          f"lmjax.checkpoint.load_run({str(workdir)!r}) (python -m infer --quant "
          f"{quant.qat} serves the format's default groups)")


def served_target(quant: QuantConfig, target: tuple[Any, Any] | None):
  """`Job.eval_target`'s `(model, params)` with the params as served (dequantized PTQ) under
  QAT, so task metrics score the quantized model; as it is otherwise."""
  if target is None or not quant.enabled:
    return target
  model, params = target
  return model, quantizer(quant, model)(params)


def report_line(result: dict[str, Any]) -> str:
  """The closing line of a QAT run (its `report.json` entry "quant")."""
  q, v = result["quant"], result["validation"]
  f = q["validation_float"]
  return (f"QAT {q['qat']}: the validation figures above are the quantized model's (loss "
          f"{v['loss']:.4f}); the same weights in float: loss {f['loss']:.4f}, perplexity "
          f"{f['perplexity']:.2f}. Serve it quantized: {q['serve']}")
