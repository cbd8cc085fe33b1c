"""qwix (Google's JAX quantization library) on lmjax: what it intercepts, how close, how fast.

qwix's `quantize_model` wraps a Flax model's `__call__`; while it runs, it patches
`jax.numpy.dot` (PTQ only), `jax.numpy.einsum`, `jax.lax.dot_general` and
`flax.linen.Module.param`. Each product inside a module whose path matches a rule asks
`find_param` whether an operand is one of that module's params; if so, PTQ quantizes it and puts
a `WithAux(QArray)` in the param's place, in the shape the product reads it, and QAT (QtProvider)
fake-quantizes it in the forward with a straight-through backward.

lmjax's `Einsum` computes a projection with `lmjax.layers.project`: the kernel cast to the compute
dtype, reshaped to a matrix, one `jnp.dot`. The script records what that does under qwix, stock:

* PTQ, any rule that matches an attention projection: `init` stops in qwix's metadata update (the
  `[D, N, H]` kernel reaches `jnp.dot` as `[D, N*H]`; qwix stores the quantized weight in that
  shape and derives its sharding names from the param's three names);
* PTQ, a rule for the 2-D feed-forward kernels only: `init` works, `apply` stops at
  `w.astype(dtype)` (qwix's `WithAux.astype` cannot rebox a bare `QArray` in linen), and then
  at `w.reshape(kdim, -1)` (its `WithAux.reshape` takes no -1);
* QAT: no error and no effect: QtProvider does not patch `jnp.dot`; only a first trace of a new
  `jnp.dot` shape, run eagerly, reaches its `lax.dot_general` patch (none under `jax.jit`), and
  the logits equal float32's (its weight lookups are logged).

Driven differently (no lmjax change): `routed()`, an `nn.intercept_methods` function that computes
each `Einsum` as `jnp.einsum(eqn, x, kernel)` on the kernel as stored, the form qwix's einsum
interception reads with the einsum's own channel axes. Then PTQ int8 / int4 / NF4 and QAT work
on every projection; the tied embedding must stay out of the rules (its lookup is a `jnp.take`
that cannot read a `WithAux`). Measured on SmolLM2-135M-Instruct: logits against float32 and
against `lmjax.quant` on the same tokens (with qwix's scales matched to lmjax's, the same codes),
held-out perplexity (`benchmarks/quant.py`'s), and batch-1 decode tokens/s through
`infer.generate` beside lmjax int8, packed int8 and float32 in the same run (`quant.py`'s
interleaved best-of timing); QAT a few steps on a tiny model.

    python benchmarks/qwix_compare.py [--repeats 2] [--tiny]

Writes benchmarks/results/qwix_compare.json (`--tiny`: a random tiny model, a smoke test that
writes nothing). CPU figures are relative only; the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import sys
import time
import traceback
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax.traverse_util import flatten_dict
from qwix._src.providers.ptq import WithAux
from qwix._src.utils import flax_util

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quant  # noqa: E402  (held-out text, perplexity, interleaved decode timing)

import infer  # noqa: E402
import lmjax  # noqa: E402
import lmjax.peft  # noqa: E402,F401  (infer.decode checks lmjax.peft.Adapted)
from infer.sampling import Greedy  # noqa: E402
from lmjax.layers import Einsum, dtype_of, param  # noqa: E402

LAYERS = r"decoder/.*"  # every projection of every layer; the tied embedding stays float
# qwix's symmetric scale is absmax / (qmax + 0.5), lmjax's absmax / qmax: this factor on the
# calibrated absmax gives lmjax's scales ("-matched" variants).
MATCH = {"int8": "absmax,%r" % (127.5 / 127), "int4": "absmax,%r" % (7.5 / 7), "nf4": "absmax"}
QTYPE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
TINY = dict(vocab_size=97, model_dim=256, num_heads=4, num_kv_heads=2, ffn_dim=512,
            num_decoder_layers=2, max_len=512, activation="swiglu", norm="rmsnorm",
            position="rotary", use_bias=False)  # --tiny, and the QAT check (narrower)
TILE = {"int8": None, "int4": 64, "nf4": 64}  # lmjax's default groups (int8: per channel)


class Routed(lmjax.CausalLM):
  """`CausalLM` under another type: `infer`'s compiled decoders are cached by model type, and
  the float32 control run under `routed()` must not reuse float32's loop."""


def _einsum_route(next_fun, args, kwargs, context):
  m = context.module
  if not (isinstance(m, Einsum) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  dtype = dtype_of(m.dtype)
  w = param(m, "kernel", m.kernel_init, m.shape, m.axes, dtype_of(m.param_dtype))
  y = jnp.einsum(m.eqn, args[0].astype(dtype), w)  # the kernel as stored: no cast, no reshape
  if m.bias_axes is not None:
    b = param(m, "bias", nn.initializers.zeros_init(), y.shape[-len(m.bias_axes):], m.bias_axes,
              dtype_of(m.param_dtype)).astype(dtype)
    y = y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)
  return y


@contextlib.contextmanager
def routed():
  """Within: every lmjax `Einsum` is one `jnp.einsum` on its stored kernel (what qwix reads)."""
  with nn.intercept_methods(_einsum_route):
    yield


@contextlib.contextmanager
def weight_lookups(log: list):
  """Within: each qwix `find_param` call appends (module path, operand shape, param found)."""
  orig = flax_util.find_param

  def logged(x, *a, **k):
    found = orig(x, *a, **k)
    log.append(("/".join(map(str, flax_util.get_current_module_path())), tuple(x.shape), found))
    return found
  flax_util.find_param = logged
  try:
    yield
  finally:
    flax_util.find_param = orig


def _error(e: Exception) -> str:
  frames = [f for f in traceback.extract_tb(e.__traceback__) if "/work/" in f.filename]
  where = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in frames[-3:]]
  return f"{type(e).__name__}: {str(e)[:240]} | at " + " <- ".join(reversed(where))


def ptq(model, fmt: str, matched: bool, path: str = LAYERS):
  rule = qwix.QtRule(module_path=path, weight_qtype=QTYPE[fmt], tile_size=TILE[fmt],
                     weight_calibration_method=MATCH[fmt] if matched else "absmax")
  return qwix.quantize_model(model, qwix.PtqProvider([rule]))


def abstract(qmodel, tokens):
  return jax.eval_shape(qmodel.init, jax.random.key(0), tokens)["params"]


def quantized_paths(tree) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, WithAux))[0]
  return [jax.tree_util.keystr(p) for p, x in flat if isinstance(x, WithAux)]


def qwix_bytes(tree) -> int:
  leaves = jax.tree.leaves(tree)
  return sum(x.size * (4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize) // 8 for x in leaves)


def disagreement(qp, qparams) -> dict:
  """Per projection name: the fraction of weights whose dequantized values differ (beyond float
  rounding) between qwix's quantized params `qp` and lmjax's `QuantParams`."""
  fracs = {}
  for path, w in flatten_dict(qp).items():
    if isinstance(w, WithAux):
      a = np.asarray(qwix.dequantize(w.array), np.float32)
      b = np.asarray(lmjax.quant.dequantize(flatten_dict(qparams.tree)[path], jnp.float32))
      fracs.setdefault(path[-2], []).append(np.mean(np.abs(a - b) > 1e-6 * np.abs(b).max()))
  return {k: float(np.mean(v)) for k, v in sorted(fracs.items())}


def stock_attempts(model, params, tokens) -> dict:
  """qwix on the unmodified lmjax model: where each attempt stops, and what qwix saw."""
  out, log = {}, []
  with weight_lookups(log):
    try:
      abstract(ptq(model, "int8", False, ".*"), tokens)
      out["ptq_all"] = {"ok": True}
    except Exception as e:  # noqa: BLE001  (the point is to record it)
      mod, shape, found = log[-1]
      kernel = flax_util.get_value_from_path(params, tuple(mod.split("/")) + ("kernel",))
      out["ptq_all"] = {"ok": False, "stage": "init", "error": _error(e), "module": mod,
                        "operand_shape": shape, "param_found": found,
                        "kernel_shape": tuple(kernel.shape)}
  qm = ptq(model, "int8", False, r"decoder/.*/mlp/.*")
  abs_q = abstract(qm, tokens)
  entry = {"quantized_at_init": len(quantized_paths(abs_q))}
  try:
    qm.apply({"params": qwix.quantize_params(params, abs_q)}, tokens)
    entry["ok"] = True
  except Exception as e:  # noqa: BLE001
    entry.update(ok=False, stage="apply", error=_error(e))
  out["ptq_mlp_only"] = entry
  qt = qwix.quantize_model(model, qwix.QtProvider([qwix.QtRule(module_path=LAYERS,
                                                               weight_qtype=jnp.int8)]))
  lf = model.apply({"params": params}, tokens)
  for mode, f in (("eager", qt.apply), ("jit", jax.jit(qt.apply))):
    log = []
    with weight_lookups(log):
      lq = f({"params": params}, tokens)
    out[f"qat_{mode}"] = {"weights_found": sorted({m for m, _, w in log if w}),
                          "modules_looked_up": sorted({m for m, _, _ in log}),
                          "logits_max_abs_diff_vs_float32": float(jnp.abs(lq - lf).max())}
  try:  # routed, with the embedding in the rules: quantized by its tied output einsum
    with routed():
      qm = ptq(model, "int8", False, ".*")
      abs_q = abstract(qm, tokens)
      qm.apply({"params": qwix.quantize_params(params, abs_q)}, tokens)
    out["routed_with_embedding"] = {"ok": True}
  except Exception as e:  # noqa: BLE001
    out["routed_with_embedding"] = {"ok": False, "quantized_at_init": quantized_paths(abs_q)[:1],
                                    "error": _error(e)}
  return out


def generate_run(model, params, prompt, route: bool):
  def run(n):
    with routed() if route else contextlib.nullcontext():
      return infer.generate(model, params, [prompt], max_new_tokens=n, sampler=Greedy(),
                            ignore_eos=True, add_bos=False, cache_size=quant.CACHE)
  return run


def qat_tiny() -> dict:
  """qwix QAT (QtProvider, int8 weights) on a tiny lmjax model: stock, then routed."""
  cfg = lmjax.TransformerConfig(**{**TINY, "model_dim": 64, "ffn_dim": 128})
  model = lmjax.CausalLM(cfg)
  toks = jax.random.randint(jax.random.key(1), (4, 33), 1, 97, jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), toks)["params"])
  rule = qwix.QtRule(module_path=LAYERS, weight_qtype=jnp.int8,
                     weight_calibration_method=MATCH["int8"])
  qt = qwix.quantize_model(model, qwix.QtProvider([rule]))

  def loss(p, m=qt):
    lp = jax.nn.log_softmax(m.apply({"params": p}, toks[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(lp, toks[:, 1:, None], -1))
  out = {}
  served = lmjax.quant.apply(model, lmjax.quant.quantize(model, params, "int8", embeddings=False,
                                                         per_output=True), toks)
  for name, ctx in (("stock", contextlib.nullcontext), ("routed", routed)):
    log = []
    with ctx(), weight_lookups(log):
      logits = qt.apply({"params": params}, toks)
      grads = jax.grad(loss)(params)
      step = jax.jit(jax.value_and_grad(loss))
      opt = optax.adam(1e-2)
      p, st, losses = params, opt.init(params), []
      for _ in range(5):
        v, g = step(p)
        u, st = opt.update(g, st)
        p = optax.apply_updates(p, u)
        losses.append(float(v))
    gf = jax.grad(lambda p: loss(p, model))(params)
    flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat_f = dict(jax.tree_util.tree_flatten_with_path(gf)[0])
    rel = max(float(jnp.linalg.norm(g - flat_f[k]) / jnp.linalg.norm(flat_f[k]))
              for k, g in flat_g if "kernel" in jax.tree_util.keystr(k))
    out[name] = {
        "projections_seen_as_weights": len({m for m, _, f in log if f}),
        "logits_max_abs_diff_vs_float32": float(jnp.abs(logits - model.apply(
            {"params": params}, toks)).max()),
        "logits_max_abs_diff_vs_lmjax_ptq_int8": float(jnp.abs(logits - served).max()),
        "kernel_grad_max_rel_diff_vs_float_grad": rel,
        "all_kernel_grads_finite_nonzero": all(
            bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for _, g in flat_g),
        "adam_losses": losses}
  out["projections"] = 7 * cfg.num_decoder_layers
  return out


def setup(tiny: bool):
  t0 = time.perf_counter()
  if tiny:
    cfg = lmjax.TransformerConfig(**TINY)
    params = nn.meta.unbox(lmjax.CausalLM(cfg).init(jax.random.key(0),
                                                     jnp.ones((1, 8), jnp.int32))["params"])
    ids = [int(i) for i in np.random.default_rng(0).integers(1, 97, 2000)]
  else:
    cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
    text = gzip.open(quant.CORPUS, "rt").read()
    ids = tok.encode(text[len(text) // 2:][:40_000])  # benchmarks/quant.py's held-out ids
  jax.block_until_ready(params)
  return cfg, params, ids, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--tiny", action="store_true", help="a random tiny model; writes nothing")
  args = ap.parse_args()
  load0 = os.getloadavg()
  cfg, params, ids, load_s = setup(args.tiny)
  model = lmjax.CausalLM(cfg)
  prompt = ids[:quant.PROMPT]
  tokens = jnp.asarray(prompt)[None]
  stock = stock_attempts(model, params, tokens)
  print("stock:", stock, flush=True)
  lf = quant.forward(model, params)(params, tokens)

  # Each variant: (how its params are made, routed?). qwix "-matched": lmjax's scales.
  def lmjax_q(fmt, **kw):
    return lambda: lmjax.quant.quantize(model, params, fmt, **kw)

  def qwix_q(fmt, matched):
    def make():
      qm = ptq(model, fmt, matched)
      with routed():
        abs_q = abstract(qm, tokens)
      return qm, qwix.quantize_params(params, abs_q), len(quantized_paths(abs_q))
    return make
  variants = {
      "float32": (lambda: params, False),
      "float32-routed": (lambda: (Routed(cfg), params, None), True),  # the route, no qwix
      "lmjax-int8": (lmjax_q("int8"), False),
      "lmjax-int8-layers": (lmjax_q("int8", embeddings=False, per_output=True), False),
      "qwix-int8": (qwix_q("int8", False), True),
      "qwix-int8-matched": (qwix_q("int8", True), True),
      "lmjax-int4-layers": (lmjax_q("int4", embeddings=False), False),
      "qwix-int4": (qwix_q("int4", False), True),
      "qwix-int4-matched": (qwix_q("int4", True), True),
      "lmjax-nf4-layers": (lmjax_q("nf4", embeddings=False), False),
      "qwix-nf4": (qwix_q("nf4", True), True),
      "packed-int8": (lambda: lmjax.packed.pack(model, params, "int8"), False),
  }
  decode = ("float32", "float32-routed", "lmjax-int8", "packed-int8", "qwix-int8", "qwix-int4")
  # qwix variant -> the lmjax one it is compared with ("-layers": the embedding left float).
  pairs = {"qwix-int8": "lmjax-int8", "qwix-int8-matched": "lmjax-int8-layers",
           "qwix-int4": "lmjax-int4-layers", "qwix-int4-matched": "lmjax-int4-layers",
           "qwix-nf4": "lmjax-nf4-layers"}
  keep = {"qwix-int8-matched", "lmjax-int8-layers", "qwix-int4-matched", "lmjax-int4-layers",
          "qwix-nf4", "lmjax-nf4-layers"}  # params kept to compare codes
  rows, logits, runs, made_params = [], {}, {}, {}
  for name, (make, route) in variants.items():
    row = {"format": name}
    try:
      t0 = time.perf_counter()
      made = make()
      m, p, nq = made if isinstance(made, tuple) else (model, made, None)
      jax.block_until_ready(p)
      if name in keep:
        made_params[name] = p
      row["quantize_s"] = time.perf_counter() - t0
      row["quantized_params"] = nq
      row["MB"] = (qwix_bytes(p) if route else lmjax.quant.nbytes(p) if isinstance(
          p, lmjax.quant.QuantParams) else sum(x.nbytes for x in jax.tree.leaves(p))) / 1e6
      with routed() if route else contextlib.nullcontext():
        logits[name] = quant.forward(m, p)(p, tokens)
        row["perplexity"] = quant.perplexity(m, p, ids[quant.PROMPT:])
      row["max_abs_diff_vs_float32"] = float(jnp.abs(logits[name] - lf).max())
      if name in decode:
        runs[name] = {"run": generate_run(m, p, prompt, route)}
        runs[name]["tokens"] = runs[name]["run"](quant.NEW).tokens[0]
        runs[name]["run"](1)  # both lengths compiled before timing
    except Exception as e:  # noqa: BLE001  (record what qwix cannot do, go on)
      row["error"] = _error(e)
    rows.append(row)
    print(row, flush=True)
  for row in rows:  # same codes? (qwix "-matched" against lmjax's layers-only quantization)
    other = pairs.get(row["format"])
    if row["format"] in made_params and other in made_params:
      row["weights_differing"] = disagreement(made_params[row["format"]], made_params[other])
  made_params.clear()
  for row in rows:
    other = pairs.get(row["format"])
    if other and row["format"] in logits and other in logits:
      row["vs"] = other
      row["max_abs_diff_vs_lmjax"] = float(jnp.abs(logits[row["format"]] - logits[other]).max())
    if row["format"] in logits and "lmjax-int8" in logits:
      row["max_abs_diff_vs_lmjax_int8"] = float(
          jnp.abs(logits[row["format"]] - logits["lmjax-int8"]).max())
  best = quant.decode_seconds(runs, args.repeats)
  ref = runs["float32"]["tokens"]
  for row in rows:
    f = row["format"]
    if f in best:
      same = [a == b for a, b in zip(runs[f]["tokens"], ref)]
      row["agree_all"] = float(np.mean(same))
      row["decode_tok_s"] = (quant.NEW - 1) / best[f]
      row["vs_float32"] = best["float32"] / best[f]
      if "packed-int8" in best:
        row["vs_packed_int8"] = best["packed-int8"] / best[f]
  qat = qat_tiny()
  cols = ["format", "quantized_params", "MB", "quantize_s", "perplexity",
          "max_abs_diff_vs_float32", "vs", "max_abs_diff_vs_lmjax", "agree_all", "decode_tok_s",
          "vs_float32", "vs_packed_int8"]
  print(common.table(rows, cols))
  for row in rows:
    if "weights_differing" in row:
      print(f"{row['format']} vs {row['vs']}: weights differing", row["weights_differing"])
  print("qat:", qat)
  print(f"load {load0} -> {os.getloadavg()}; float32 load {load_s:.1f} s")
  if not args.tiny:
    path = common.write("qwix_compare", {
        "qwix": qwix.__version__, "stock": stock, "rows": rows, "qat_tiny": qat,
        "float32_load_s": load_s, "load_start": load0, "load_end": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
