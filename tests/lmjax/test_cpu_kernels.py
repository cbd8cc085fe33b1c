"""The hand-written CPU kernels (`lmjax.quant.cpu_int4`, `lmjax.quant.cpu_int8`,
`lmjax.quant.cpu_float`, `lmjax.quant.cpu_attention`): each custom call against float64 numpy
of its stated math (inputs
rounded to int8 per group, integer dot products, the scales; float products), the AVX2 build
(`$LMJAX_CPU_MARCH=haswell`) against the same, a packed int4 model's decoding against
`model.apply` on dequantized weights with each projection's input rounded the same way, where
they apply, and a failed build."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from lmjax import packed
from lmjax.attention_ops import cached_attention
from lmjax.quant import cpu_attention, cpu_build, cpu_float, cpu_int4, cpu_int8, packed_int4
from tests.lmjax.activation_fixtures import rounded_apply
from tests.lmjax.helpers import random_params, tiny, tokens

pytestmark = pytest.mark.skipif(not (cpu_int4.available() and cpu_int8.available()
                                     and cpu_float.available(jnp.bfloat16)
                                     and cpu_attention.available(jnp.bfloat16)),
                                reason="the CPU kernels need an x86-64 Linux CPU with AVX2 and a "
                                "C++20 compiler")


def _np_round_groups(x, group):
  """`x [M, K]` rounded to int8 per group of `group` inputs as the kernel states it: codes
  `round_half_even(x * (127 / absmax))` in float32 arithmetic, scales `absmax / 127`; (codes,
  float64 scales `[M, G]`)."""
  g = np.asarray(x, np.float32).reshape(len(x), -1, group)
  amax = np.abs(g).max(-1, keepdims=True)
  inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
  q = np.round(g * inv.astype(np.float32))
  return q.reshape(np.shape(x)).astype(np.float64), (amax[..., 0] / np.float32(127)).astype(
      np.float64)


def _np_product(x, b, scale):
  """float64 reference: codes unpacked from the row halves, each group's integer dot product
  with the rounded inputs summed exactly, then `sx * (scale * dot + offset * sum(xq))`."""
  n, half = b.shape
  g = scale.shape[1]
  gs = 2 * half // g
  codes = np.concatenate([b & 15, b >> 4], axis=1).astype(np.int64)  # [N, K], input order
  xq, sx = _np_round_groups(x, gs)
  xq = xq.astype(np.int64).reshape(len(x), g, gs)
  dot = np.einsum("mGg,nGg->mnG", xq, codes.reshape(n, g, gs)).astype(np.float64)
  s, z = (np.asarray(scale[..., i], np.float64) for i in (0, 1))
  terms = sx[:, None, :] * (s[None] * dot + z[None] * xq.sum(-1)[:, None, :].astype(np.float64))
  size = np.abs(sx[:, None, :] * s[None] * dot).sum(-1) + np.abs(
      sx[:, None, :] * z[None] * xq.sum(-1)[:, None, :]).sum(-1)
  return terms.sum(-1), size


def _inputs(rows, k, group, seed):
  """Rows of very different magnitudes, an all-zero group, and a group of exact ties
  (x / scale = +-0.5, 1.5, 2.5: half to even gives 0, 2, 2)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
  x[0, :group] = 0
  x[-1, group:2 * group] = np.resize([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.0], group)
  return x.astype(np.float32)


@pytest.mark.parametrize("m,n,k,group", [(1, 37, 128, 32), (2, 8, 192, 32), (5, 41, 256, 64),
                                         (9, 16, 128, 32), (16, 6, 512, 128), (1, 37, 1152, 32),
                                         (3, 19, 1536, 32), (3, 10, 64, 16)])
def test_product_equals_float64_reference(m, n, k, group):
  """The kernel where it applies; groups of 16 (last case): the same rounded inputs through
  XLA's weight-only loop."""
  rng = np.random.default_rng(m * n)
  b = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
  scale = np.stack([rng.random((n, k // group)) / 50 + 1e-3,
                    rng.standard_normal((n, k // group)) / 20], -1).astype(np.float32)
  x = _inputs(m, k, group, m)
  kernel = group % 32 == 0
  assert cpu_int4.applies(jnp.asarray(x), jnp.asarray(b), jnp.asarray(scale)) == kernel
  f = jax.jit(lambda x, b, s: cpu_int4.matmul_t(x, b, s, _xla_loop))
  assert (cpu_int4.TARGET in f.lower(x, b, scale).as_text()) == kernel
  got = np.asarray(f(x, b, scale), np.float64)
  want, size = _np_product(x, b, scale)
  assert np.all(np.abs(got - want) <= 2e-6 * size + 1e-30)  # relative to the terms' sizes
  # The plain jnp statement of the same math agrees, and the unrounded product does not.
  np.testing.assert_allclose(np.asarray(cpu_int4.reference(x, b, scale)), want,
                             atol=2e-6 * size.max())
  plain = x.astype(np.float64) @ np.asarray(packed_int4.dequantized(b, scale), np.float64).T
  assert np.abs(plain - want).max() > 30 * np.abs(got - want).max()


def test_nan_inputs_give_nan_outputs():
  rng = np.random.default_rng(0)
  b = rng.integers(0, 256, (5, 64), dtype=np.uint8)
  scale = (rng.random((5, 4, 2)) / 50 + 1e-3).astype(np.float32)
  x = rng.standard_normal((2, 128)).astype(np.float32)
  x[0, 37] = np.nan  # one input of the first row's second group
  got = np.asarray(jax.jit(lambda x, b, s: cpu_int4.matmul_t(x, b, s, _xla_loop))(x, b, scale))
  assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()
  assert np.isnan(np.asarray(cpu_int4.reference(x, b, scale))[0]).all()


def _np_product8(x, w, scale):
  """float64 reference of the int8 kernel: inputs rounded per group of 32, exact integer dot
  products per group, times the group's and the output's scales; and the sizes of the terms
  the kernel adds in float32 (each lane's sum of 4 products, times its group's scale)."""
  m, k = x.shape
  xq, sx = _np_round_groups(x, 32)
  lanes = np.einsum("mLl,nLl->mnL", xq.astype(np.int64).reshape(m, k // 4, 4),
                    np.asarray(w, np.int64).reshape(len(w), k // 4, 4)).astype(np.float64)
  terms = lanes * np.repeat(sx, 8, axis=-1)[:, None, :] * np.asarray(scale, np.float64)[None]
  return terms.sum(-1), np.abs(terms).sum(-1)


def _int8_case(m, n, k, seed):
  rng = np.random.default_rng(seed)
  w = rng.integers(-128, 128, (n, k), dtype=np.int8)  # -128 too (quantize gives +-127)
  scale = (rng.random((n, 1)) / 50 + 1e-3).astype(np.float32)
  return _inputs(m, k, min(32, k // 2), seed), w, scale


INT8_CASES = [(1, 37, 576, 0), (2, 9, 1536, 1), (3, 23, 64, 5), (5, 41, 96, 2), (9, 16, 32, 3),
              (16, 6, 160, 4)]


@pytest.mark.parametrize("m,n,k,seed", INT8_CASES)
def test_int8_product_equals_float64_reference(m, n, k, seed):
  """Widths of 64s and a 32 tail, 1-16 rows, output rows not a multiple of the row blocks."""
  x, w, scale = _int8_case(m, n, k, seed)
  assert cpu_int8.applies(jnp.asarray(x), jnp.asarray(w), jnp.asarray(scale))
  f = jax.jit(lambda x, w, s: cpu_int8.matmul_t(x, w, s, _int8_loop))
  assert cpu_int8.TARGET in f.lower(x, w, scale).as_text()
  got = np.asarray(f(x, w, scale), np.float64)
  want, size = _np_product8(x, w, scale)
  assert np.all(np.abs(got - want) <= 2e-6 * size + 1e-30)
  np.testing.assert_allclose(np.asarray(cpu_int8.reference(x, w, scale)), want,
                             atol=2e-6 * size.max())
  plain = x.astype(np.float64) @ (w.astype(np.float64) * scale).T
  assert np.abs(plain - want).max() > 30 * np.abs(got - want).max()
  x[0, k - 3] = np.nan  # a NaN input (in the last group): its row NaN, the others not
  got = np.asarray(f(x, w, scale))
  assert np.isnan(got[0]).all() and np.isfinite(got[1:]).all()


def test_int8_kernel_applies_to_per_output_scales_of_32s():
  x, w = jnp.zeros((1, 64)), jnp.zeros((8, 64), jnp.int8)
  assert cpu_int8.applies(x, w, jnp.zeros((8, 1)))
  assert not cpu_int8.applies(x, w, jnp.zeros((8, 2)))  # a scale per head and output
  assert not cpu_int8.applies(jnp.zeros((1, 48)), jnp.zeros((8, 48), jnp.int8), jnp.zeros((8, 1)))
  assert not cpu_int8.applies(jnp.zeros((17, 64)), w, jnp.zeros((8, 1)))  # a prompt
  assert not cpu_int8.applies(x, w.astype(jnp.uint8), jnp.zeros((8, 1)))


FLOAT_CASES = [(1, 37, 576, "float32"), (1, 45, 48, "bfloat16"), (2, 9, 1536, "bfloat16"),
               (5, 41, 48, "float32"), (6, 29, 64, "float32"), (7, 23, 32, "bfloat16"),
               (9, 16, 16, "float32"), (16, 6, 160, "bfloat16")]


def _float_case(m, n, k, dtype):
  rng = np.random.default_rng(m * n)
  x = (rng.standard_normal((m, k)) * 10.0 ** rng.integers(-3, 3, (m, 1))).astype(np.float32)
  return x, jnp.asarray(rng.standard_normal((n, k)), dtype)


def _np_float_product(x, w):
  """float64 reference of `x @ w.T` (the weights widened exactly) and the sum of the terms'
  magnitudes (what float32 rounding is relative to)."""
  x, w = np.asarray(x, np.float64), np.asarray(w.astype(jnp.float32), np.float64)
  return x @ w.T, np.abs(x) @ np.abs(w).T


@pytest.mark.parametrize("m,n,k,dtype", FLOAT_CASES)
def test_float_product_equals_float64_reference(m, n, k, dtype):
  """1-16 rows, float32 and bfloat16 weights, output rows not a multiple of the row blocks
  (one row: four parts side by side, and a remainder)."""
  x, w = _float_case(m, n, k, dtype)
  assert cpu_float.applies(jnp.asarray(x), w)
  f = jax.jit(lambda x, w: cpu_float.matmul_t(x, w, _float_dot))
  assert cpu_float.TARGETS[jnp.dtype(dtype)][1] in f.lower(x, w).as_text()
  want, size = _np_float_product(x, w)
  assert np.all(np.abs(np.asarray(f(x, w), np.float64) - want) <= 1e-6 * size + 1e-30)
  x[0, k - 3] = np.nan  # a NaN input: its row NaN, the others not
  got = np.asarray(f(x, w))
  assert np.isnan(got[0]).all() and np.isfinite(got[1:]).all()


def test_float_kernel_applies_to_16s():
  x, w = jnp.zeros((2, 32)), jnp.zeros((8, 32))
  assert cpu_float.applies(x, w) and cpu_float.applies(x, w.astype(jnp.bfloat16))
  assert not cpu_float.applies(jnp.zeros((2, 24)), jnp.zeros((8, 24)))  # not a multiple of 16
  assert not cpu_float.applies(jnp.zeros((17, 32)), w.astype(jnp.bfloat16))  # a prompt
  assert cpu_float.applies(jnp.zeros((9, 32)), w)
  assert not cpu_float.applies(jnp.zeros((10, 32)), w)  # float32: at most 9 rows
  assert not cpu_float.applies(x, w.astype(jnp.int8))  # codes: cpu_int8's
  assert not cpu_float.applies(x, w.astype(jnp.float16))


ATTENTION_CASES = [  # (B, T, N, K, S, H, cache dtype, used)
    (1, 1, 9, 3, 256, 64, "float32", 190), (2, 5, 8, 2, 300, 64, "float32", 300),
    (3, 1, 4, 4, 130, 128, "bfloat16", 77), (2, 16, 6, 3, 64, 32, "bfloat16", 64),
    (1, 2, 2, 1, 17, 16, "float32", 9), (2, 3, 4, 2, 40, 272, "float32", 33)]


def _attention_case(b, t, n, kh, s, h, dtype, used):
  """Queries, a cache with stale values beyond `used` and a decode mask: row b's T tokens at
  slots lengths[b] .. used - 1 - (B - 1 - b); row 1 (when there is one) sees no slot."""
  rng = np.random.default_rng(b * t * s + h)
  q = (rng.standard_normal((b, t, n, h)) * 2).astype(np.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, kh, s, h)) * 2, dtype) for _ in range(2))
  ends = np.maximum(np.asarray([used - i for i in range(b)][::-1]), t)
  slot = (ends - t)[:, None] + np.arange(t)[None, :]
  j = np.arange(s)[None, None, :]
  mask = (j <= slot[:, :, None]) & (j < ends[:, None, None])
  if b > 1:
    mask[1] = False
  return q, k, v, mask


def _np_attention(q, k, v, mask, round_p):
  """float64 softmax attention (kv head n // G), zeros where a query sees nothing; p rounded
  to `round_p` (the cache dtype) before it weighs v, as `grouped_attention` does."""
  g = q.shape[2] // k.shape[1]
  k, v = (np.repeat(np.asarray(a.astype(jnp.float32), np.float64), g, axis=1) for a in (k, v))
  sc = np.einsum("btnh,bnsh->btns", np.asarray(q, np.float64), k) / np.sqrt(q.shape[-1])
  sc = np.where(mask[:, :, None], sc, -np.inf)
  top = sc.max(-1, keepdims=True)
  e = np.where(mask[:, :, None], np.exp(sc - np.where(np.isfinite(top), top, 0)), 0)
  p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  p = np.asarray(jnp.asarray(p, jnp.float32).astype(round_p).astype(jnp.float32), np.float64)
  return np.einsum("btns,bnsh->btnh", p, v), np.einsum("btns,bnsh->btnh", p, np.abs(v))


def _assert_attention_close(got, want, size, dtype):
  """float32 rounding of the terms; with a bfloat16 cache a p within float32 rounding of a
  bfloat16 tie may round the other way (one bfloat16 step of that term): few outputs."""
  close = np.abs(got - want) <= 2e-6 * size + 1e-7
  if dtype == jnp.bfloat16:
    assert np.all(np.abs(got - want) <= 2.0 ** -8 * size + 1e-7) and close.mean() > 0.99
  else:
    assert close.all()


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_cached_attention_kernel_equals_float64_reference(case):
  """Group sizes 1-4, 1-16 new tokens, `used` not a multiple of the 8-key blocks, head dims
  16-272 (more than the 16 vectors kept in registers), a row that sees no slot, bfloat16 caches
  (p rounded to bfloat16 first); stale values beyond `used` never read."""
  q, k, v, mask = _attention_case(*case)
  used = jnp.int32(case[-1])
  assert cpu_attention.applies(jnp.asarray(q), k)
  f = jax.jit(lambda *a: cached_attention(*a))  # a fresh trace (not the other path's)
  assert cpu_attention.TARGETS[jnp.dtype(case[6])][1] in f.lower(q, k, v, mask, used).as_text()
  want, size = _np_attention(q, k, v, mask, k.dtype)
  got = np.asarray(f(q, k, v, mask, used), np.float64)
  _assert_attention_close(got, want, size, k.dtype)
  if case[0] > 1:
    assert not got[1].any()  # sees nothing: zeros
  stale = k.at[:, :, case[-1]:].set(jnp.nan), v.at[:, :, case[-1]:].set(jnp.nan)
  np.testing.assert_array_equal(np.asarray(f(q, *stale, mask, used)), got.astype(np.float32))


def test_cached_attention_kernel_applies():
  q, k = jnp.zeros((1, 1, 9, 64)), jnp.zeros((1, 3, 256, 64))
  assert cpu_attention.applies(q, k) and cpu_attention.applies(q, k.astype(jnp.bfloat16))
  assert cpu_attention.applies(jnp.zeros((1, cpu_attention.MAX_TOKENS, 9, 64)), k)
  assert not cpu_attention.applies(jnp.zeros((1, cpu_attention.MAX_TOKENS + 1, 9, 64)), k)
  assert not cpu_attention.applies(jnp.zeros((1, 1, 9, 40)), jnp.zeros((1, 3, 256, 40)))
  assert not cpu_attention.applies(q, k.astype(jnp.float16))
  with jax.set_mesh(jax.make_mesh((2,), ("data",))):  # a sharded cache: XLA's path
    assert not cpu_attention.applies(q, k)


def _float_dot(x, w):
  return jnp.dot(x, w.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)


def _int8_loop(x, w, s):
  return jnp.dot(packed._flat_copy(x), w.astype(jnp.float32).T) * s.T


KERNELS = ("cpu_int4", "cpu_int8", "cpu_float", "cpu_attention")
_AVX2_RUN = """
import json, sys
import numpy as np, jax, jax.numpy as jnp
from lmjax.attention_ops import cached_attention
from lmjax.quant import cpu_attention, cpu_build, cpu_float, cpu_int4, cpu_int8, packed_int4
KERNELS = {kernels!r}
assert cpu_int4.available() and cpu_int8.available()
data = np.load(sys.argv[1])
f4 = jax.jit(lambda x, b, s: cpu_int4.matmul_t(
    x, b, s, lambda x, b, s: x @ packed_int4.dequantized(b, s).T))
f8 = jax.jit(lambda x, w, s: cpu_int8.matmul_t(
    x, w, s, lambda x, w, s: x @ (w.astype(jnp.float32) * s).T))
a4, a8 = (data[n] for n in ("x4", "b4", "s4")), (data[n] for n in ("x8", "w8", "s8"))
a4, a8 = tuple(a4), tuple(a8)
assert cpu_int4.TARGET in f4.lower(*a4).as_text() and cpu_int8.TARGET in f8.lower(*a8).as_text()
ff = jax.jit(lambda x, w: cpu_float.matmul_t(x, w, lambda x, w: x @ w.astype(jnp.float32).T))
af = [(data[x], jnp.asarray(data[w], jnp.bfloat16)) for x, w in (("xf1", "wf1"), ("xf5", "wf5"))]
assert "lmjax_bf16_matmul_t" in ff.lower(*af[0]).as_text()
assert cpu_attention.available(jnp.bfloat16)
aa = (data["qa"], jnp.asarray(data["ka"], jnp.bfloat16), jnp.asarray(data["va"], jnp.bfloat16),
      data["ma"], jnp.int32(data["ua"]))
fa = jax.jit(cached_attention)
assert "lmjax_cached_attention_bf16" in fa.lower(*aa).as_text()
np.savez(sys.argv[2], int4=np.asarray(f4(*a4)), int8=np.asarray(f8(*a8)),
         float1=np.asarray(ff(*af[0])), float5=np.asarray(ff(*af[1])), att=np.asarray(fa(*aa)))
print(json.dumps([cpu_build.build(n).name for n in KERNELS]))
""".replace("{kernels!r}", repr(KERNELS))


@pytest.mark.slow
def test_avx2_build_equals_float64_reference(tmp_path):
  """The kernels built for a CPU without AVX-512 or VNNI (`-march=haswell`: vpmaddubsw, 256-bit
  vectors; a separate cached library), in a fresh process, against the float64 references."""
  rng = np.random.default_rng(7)
  b4 = rng.integers(0, 256, (19, 288), dtype=np.uint8)
  s4 = np.stack([rng.random((19, 18)) / 50 + 1e-3, rng.standard_normal((19, 18)) / 20],
                -1).astype(np.float32)
  x4 = _inputs(3, 576, 32, 7)
  x8, w8, s8 = _int8_case(5, 23, 96, 8)
  (xf1, wf1), (xf5, wf5) = (_float_case(1, 37, 48, jnp.bfloat16),
                            _float_case(5, 19, 64, jnp.bfloat16))
  acase = (2, 3, 6, 3, 70, 32, "bfloat16", 61)  # 8-lane vectors: 4 per head
  qa, ka, va, ma = _attention_case(*acase)
  np.savez(tmp_path / "in.npz", x4=x4, b4=b4, s4=s4, x8=x8, w8=w8, s8=s8, xf1=xf1, xf5=xf5,
           wf1=np.asarray(wf1, np.float32), wf5=np.asarray(wf5, np.float32), qa=qa,
           ka=np.asarray(ka, np.float32), va=np.asarray(va, np.float32), ma=ma, ua=acase[-1])
  env = dict(os.environ, LMJAX_CPU_MARCH="haswell")
  done = subprocess.run([sys.executable, "-c", _AVX2_RUN, str(tmp_path / "in.npz"),
                         str(tmp_path / "out.npz")], env=env, capture_output=True, text=True,
                        cwd=Path(__file__).resolve().parents[2])
  assert done.returncode == 0, done.stderr[-3000:]
  built = json.loads(done.stdout.strip().splitlines()[-1])
  assert not {cpu_build.build(n).name for n in KERNELS} & set(built)
  out = np.load(tmp_path / "out.npz")
  for got, (want, size) in ((out["int4"], _np_product(x4, b4, s4)),
                            (out["int8"], _np_product8(x8, w8, s8))):
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 2e-6 * size + 1e-30)
  for got, (x, w) in ((out["float1"], (xf1, wf1)), (out["float5"], (xf5, wf5))):
    want, size = _np_float_product(x, w)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 1e-6 * size + 1e-30)
  want, size = _np_attention(qa, ka, va, ma, jnp.bfloat16)
  _assert_attention_close(np.asarray(out["att"], np.float64), want, size, jnp.bfloat16)


def _xla_loop(x, b, s):
  return packed_int4._xla_matmul_t(x, b, s, len(x) == 1, packed._flat_copy)


def _model():
  cfg = tiny(model_dim=64, num_heads=2, num_kv_heads=1, ffn_dim=128, tie_embeddings=True)
  model = lmjax.model_for(cfg)
  return model, random_params(model, (tokens(0, 1, 8),), 0)


def test_decoding_equals_rounded_input_reference():
  model, params = _model()
  pk = packed.pack(model, params, "int4", activations="int8")  # groups of 32: the kernel's
  weights = packed_int4.unpack(pk)
  prompt, n = [5, 6, 7, 8, 9], 10
  step = jax.jit(lambda p, t: packed.apply(model, p, t))
  assert cpu_int4.TARGET in step.lower(pk, tokens(0, 1, 1)).as_text()  # the kernel, not XLA's
  out = infer.generate(model, pk, [prompt], max_new_tokens=n, ignore_eos=True,
                       return_logits=True)
  # The prompt's 5 rows also go through the kernel (a few rows); the reference rounds each
  # projection's input per row and group of 32 (the int8 embedding's head: weight-only).
  want = np.asarray(rounded_apply(model, weights, jnp.asarray([prompt + out.tokens[0]]),
                                  group=32, head=False)[0, len(prompt) - 1:-1], np.float64)
  got = np.asarray(out.logits[0], np.float64)
  assert out.tokens[0] == list(want.argmax(-1)) and len(set(out.tokens[0])) > 1
  np.testing.assert_allclose(got, want, atol=2e-4)
  # Weight-only packed int4 (the default): float inputs, further from this reference.
  plain = infer.generate(model, pk.replace(activations=None), [prompt], max_new_tokens=n,
                         ignore_eos=True, return_logits=True)
  assert np.abs(np.asarray(plain.logits[0]) - want).max() > 10 * np.abs(got - want).max()
  # A prompt of 17 rows or more (and the int8 embedding's head in it) stays weight-only.
  long = tokens(2, 1, cpu_int4.MAX_ROWS + 4)
  np.testing.assert_array_equal(np.asarray(step(pk, long)),
                                np.asarray(step(pk.replace(activations=None), long)))


def test_where_it_applies_and_a_failed_build(monkeypatch, tmp_path):
  x, b = jnp.zeros((1, 128)), jnp.zeros((8, 64), jnp.uint8)
  assert cpu_int4.applies(x, b, jnp.zeros((8, 4, 2)))         # groups of 32
  assert not cpu_int4.applies(x, b, jnp.zeros((8, 8, 2)))     # groups of 16
  assert not cpu_int4.applies(x, b, jnp.zeros((8, 2, 1)))     # nf4: an absmax per group
  assert not cpu_int4.applies(jnp.zeros((17, 128)), b, jnp.zeros((8, 4, 2)))  # a prompt
  assert not cpu_int4.applies(jnp.zeros((1, 192)), jnp.zeros((8, 96), jnp.uint8),
                              jnp.zeros((8, 3, 2)))  # a group of 64 across the two halves
  with pytest.raises(ValueError, match="int8 activations need format 'int8' or 'int4'"):
    packed.pack(*_model(), "nf4", activations="int8")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(RuntimeError, match="false failed"):
    cpu_build.build("cpu_int4")
  assert not list(tmp_path.rglob("*.so"))  # nothing half-built left for the next run
