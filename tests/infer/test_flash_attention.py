"""Flash attention (both Pallas kernels, in interpret mode) against the plain-jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import lmjax
from infer import flash_attention as fa
from infer import flash_common as fc
from infer.flash_attention import BlockSizes, SegmentIds, flash_attention, reference_attention
from lmjax import attention_ops
from tests.lmjax.helpers import find_eqns

BACKENDS = ("tpu", "gpu")
# Relative error bounds (scaled by the reference's largest magnitude).
FWD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
BWD_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 2e-2}
HEADS = ((2, 2), (4, 2), (3, 1))  # (N, K): MHA, GQA, MQA
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
# Always-run cases on top of the drawn ones: GQA, causal prefill (T < S) with packed segments
# over several blocks, and bfloat16 with a [B, T] segment array.
PREFILL = dict(b=2, t=20, s=37, n=4, kh=2, h=64, dtype=jnp.float32, causal=True, seg="pair",
               block=16, seed=1)
PACKED_BF16 = dict(b=1, t=33, s=33, n=4, kh=2, h=128, dtype=jnp.bfloat16, causal=False,
                   seg="array", block=16, seed=2)


def _rand(seed, shape, dtype):
  """Standard-normal inputs (numpy: no per-shape compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _segments(seed, b, length, n_seg):
  """Non-decreasing random segment ids `[B, length]` in [0, n_seg)."""
  starts = np.random.default_rng(seed).random((b, length)) < 0.2
  return jnp.asarray(np.minimum(np.cumsum(starts, axis=1), n_seg - 1), jnp.int32)


@st.composite
def cases(draw):
  b = draw(st.integers(1, 2))
  t = draw(st.integers(1, 40))
  s = draw(st.sampled_from([t, draw(st.integers(1, 40))]))
  n, kh = draw(st.sampled_from(HEADS))
  h = draw(st.sampled_from((64, 128)))
  dtype = draw(st.sampled_from((jnp.float32, jnp.bfloat16)))
  causal = draw(st.booleans())
  seg = draw(st.sampled_from((None, "array", "pair"))) if t == s else draw(
      st.sampled_from((None, "pair")))
  block = draw(st.sampled_from((16, 32)))
  seed = draw(st.integers(0, 2**16))
  return dict(b=b, t=t, s=s, n=n, kh=kh, h=h, dtype=dtype, causal=causal, seg=seg, block=block,
              seed=seed)


def _make(c):
  q = _rand(c["seed"], (c["b"], c["t"], c["n"], c["h"]), c["dtype"])
  k = _rand(c["seed"] + 1, (c["b"], c["s"], c["kh"], c["h"]), c["dtype"])
  v = _rand(c["seed"] + 2, (c["b"], c["s"], c["kh"], c["h"]), c["dtype"])
  seg = None
  if c["seg"] == "array":
    seg = _segments(c["seed"] + 3, c["b"], c["t"], 3)
  elif c["seg"] == "pair":
    seg = SegmentIds(_segments(c["seed"] + 3, c["b"], c["t"], 3),
                     _segments(c["seed"] + 4, c["b"], c["s"], 3))
  return q, k, v, seg


def _assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


def _fns(c, backend, interpret=True):
  kw = dict(causal=c["causal"])
  blocks = None if c["block"] is None else BlockSizes.uniform(c["block"])
  kernel = functools.partial(flash_attention, block_sizes=blocks, interpret=interpret,
                             backend=backend, **kw)
  return kernel, jax.jit(functools.partial(reference_attention, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(c=cases())
@example(c=PREFILL)
@example(c=PACKED_BF16)
def test_forward_matches_reference(backend, c):
  q, k, v, seg = _make(c)
  kernel, ref = _fns(c, backend)
  out = jax.jit(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(q, k, v, seg)
  assert out.shape == q.shape and out.dtype == q.dtype
  _assert_close(out, ref(q, k, v, segment_ids=seg), FWD_TOL[c["dtype"]], f"out {c}")


def _check_grads(c, backend, interpret=True):
  q, k, v, seg = _make(c)
  kernel, ref = _fns(c, backend, interpret)
  do = _rand(c["seed"] + 5, q.shape, c["dtype"])

  @jax.jit
  def kernel_vjp(q, k, v, seg):
    out, pull = jax.vjp(lambda q, k, v: kernel(q, k, v, segment_ids=seg), q, k, v)
    return out, pull(do)

  out, grads = kernel_vjp(q, k, v, seg)

  @jax.jit
  def ref_vjp(q, k, v, seg):
    out, pull = jax.vjp(lambda q, k, v: ref(q, k, v, segment_ids=seg), q, k, v)
    return out, pull(do)

  want_out, want_grads = ref_vjp(q, k, v, seg)
  tol = BWD_TOL[c["dtype"]]
  _assert_close(out, want_out, FWD_TOL[c["dtype"]], f"out {c}")
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    _assert_close(got, want, tol, f"{name} {c}")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, **SETTINGS)
@given(c=cases())
@example(c=PREFILL)
@example(c=PACKED_BF16)
def test_gradients_match_reference(backend, c):
  _check_grads(c, backend)


def test_tpu_kernel_in_tpu_interpreter():
  """The TPU-faithful interpreter: NaN-filled scratch (catches missing inits), bounds checks."""
  c = dict(b=1, t=24, s=40, n=4, kh=2, h=64, dtype=jnp.float32, causal=True, seg="pair",
           block=16, seed=7)
  _check_grads(c, "tpu", interpret=pltpu.InterpretParams())


LOWERING_CASES = [  # (dtype, causal, segments, B, T, S, N, K, H)
    (jnp.bfloat16, True, True, 2, 300, 333, 4, 2, 128),
    (jnp.float32, False, False, 1, 8, 700, 2, 1, 64),
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_for_hardware(platform, monkeypatch):
  """Forward and both backward kernels lower to Mosaic TPU / Triton from the CPU.

  This runs the Pallas lowering (block-shape rules, supported ops, dtypes) with the default
  blocks, without hardware; what follows it (Mosaic and Triton compilation) needs a TPU or GPU.
  """
  from jax._src.pallas.mosaic import tpu_info  # private: pretend a TPU v5e for Mosaic's checks

  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5e")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu" if platform == "tpu" else "gpu")
  target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  for dtype, causal, segs, b, t, s, n, kh, h in LOWERING_CASES:
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    k = jax.ShapeDtypeStruct((b, s, kh, h), dtype)
    seg = SegmentIds(jax.ShapeDtypeStruct((b, t), jnp.int32),
                     jax.ShapeDtypeStruct((b, s), jnp.int32)) if segs else None

    def f(q, k, v, seg, causal=causal):
      attend = functools.partial(flash_attention, causal=causal, segment_ids=seg, interpret=False)
      out, pull = jax.vjp(attend, q, k, v)
      return out, pull(out)

    text = jax.jit(f).trace(q, k, k, seg).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(f"custom_call @{target}") == 3, (platform, dtype, causal)


@pytest.mark.accelerator
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_kernel_on_accelerator(causal):
  """The compiled (not interpreted) kernel with its default blocks, on the platform's backend."""
  c = dict(b=2, t=300, s=333, n=4, kh=2, h=128, dtype=jnp.bfloat16, causal=causal, seg="pair",
           block=None, seed=3)
  _check_grads(c, backend=None, interpret=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros(backend):
  """Queries with no visible key (a foreign segment; T > S under causal) give 0, not NaN."""
  b, t, s, n, h = 1, 24, 16, 2, 64
  q, k, v = _rand(0, (b, t, n, h), jnp.float32), _rand(1, (b, s, n, h), jnp.float32), _rand(
      2, (b, s, n, h), jnp.float32)
  q_seg = jnp.array([[0] * 10 + [9] * 4 + [0] * 10])  # segment 9 has no keys
  seg = SegmentIds(q_seg, jnp.zeros((b, s), jnp.int32))
  do = _rand(3, q.shape, jnp.float32)
  empty = np.zeros((t,), bool)
  empty[10:14] = True
  empty[: t - s] = True  # causal, T > S: query i sees keys j <= i - 8
  kernel = functools.partial(flash_attention, causal=True, segment_ids=seg, interpret=True,
                             backend=backend, block_sizes=BlockSizes.uniform(16))
  ref = functools.partial(reference_attention, causal=True, segment_ids=seg)
  out, grads = jax.jit(lambda q, k, v: (lambda o, p: (o, p(do)))(*jax.vjp(kernel, q, k, v)))(
      q, k, v)
  want, pull = jax.vjp(jax.jit(ref), q, k, v)
  np.testing.assert_array_equal(np.asarray(out)[0, empty], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[0, empty], 0.0)
  _assert_close(out, want, FWD_TOL[jnp.float32], "out")
  for name, got, w in zip(("dq", "dk", "dv"), grads, pull(do)):
    _assert_close(got, w, BWD_TOL[jnp.float32], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_skips_blocks_above_the_diagonal(backend):
  """Blocks above the diagonal are never read: NaNs placed only there stay out of the results.

  Were a skipped block visited, its NaNs would reach the result even through a zero mask
  (0 * NaN = NaN): poisoned keys 48.. would spoil rows < 48 of out and dq, and poisoned queries
  0..15 would spoil dk and dv of keys >= 48.
  """
  b, t, n, h = 1, 64, 2, 64
  q, k, v, do = (_rand(i, (b, t, n, h), jnp.float32) for i in range(4))
  pos = jnp.arange(t)[None, :, None, None]
  k_bad, v_bad = jnp.where(pos >= 48, jnp.nan, k), jnp.where(pos >= 48, jnp.nan, v)
  q_bad = jnp.where(pos < 16, jnp.nan, q)
  kernel = functools.partial(flash_attention, causal=True, interpret=True, backend=backend,
                             block_sizes=BlockSizes.uniform(16))

  @jax.jit
  def run(q, k, v, q_bad, k_bad, v_bad):
    out, pull = jax.vjp(kernel, q, k_bad, v_bad)
    _, pull_q = jax.vjp(kernel, q_bad, k, v)
    return out, pull(do)[0], pull_q(do)[1:]

  out, dq, (dk, dv) = run(q, k, v, q_bad, k_bad, v_bad)
  want, pull = jax.vjp(jax.jit(functools.partial(reference_attention, causal=True)), q, k, v)
  want_dq, want_dk, want_dv = pull(do)
  tol = BWD_TOL[jnp.float32]
  _assert_close(out[:, :48], want[:, :48], FWD_TOL[jnp.float32], "out rows < 48")
  _assert_close(dq[:, :48], want_dq[:, :48], tol, "dq rows < 48")
  _assert_close(dk[:, 48:], want_dk[:, 48:], tol, "dk rows >= 48")
  _assert_close(dv[:, 48:], want_dv[:, 48:], tol, "dv rows >= 48")


@settings(max_examples=40, **SETTINGS)
@given(t=st.integers(1, 70), s=st.integers(1, 70), bq=st.sampled_from((8, 16, 32)),
       bk=st.sampled_from((8, 16, 32)), causal=st.booleans())
def test_block_skip_rules_match_the_dense_mask(t, s, bq, bk, causal):
  """The per-block rules (skip, mask or not, loop bounds) agree with the dense [Tp, Sp] mask."""
  t_pad, s_pad = -(-t // bq) * bq, -(-s // bk) * bk
  plan = fc.Plan(backend="gpu", interpret=True, causal=causal, scale=1.0, t=t, s=s, t_pad=t_pad,
                 s_pad=s_pad, groups=1, block_q=bq, block_k=bk, block_q_dkv=bq, block_k_dkv=bk,
                 block_q_dq=bq, block_k_dq=bk)
  qi, kj = np.arange(t_pad)[:, None], np.arange(s_pad)[None, :]
  reach = (kj <= qi + s - t) if causal else np.ones((t_pad, s_pad), bool)
  mask = reach & (kj < s)
  n_q, n_k = t_pad // bq, s_pad // bk
  blocks = lambda m, i, j: m[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]  # noqa: E731
  for i in range(n_q):
    visible = [bool(blocks(reach, i, j).any()) for j in range(n_k)]
    whole = [bool(blocks(mask, i, j).all()) for j in range(n_k)]
    assert [bool(fc.block_visible(i, j, bq, bk, plan)) for j in range(n_k)] == visible
    assert int(fc.num_visible_kv_blocks(i, bq, bk, plan)) == sum(visible)
    assert visible == sorted(visible, reverse=True)  # visible blocks are a prefix
    n_whole = int(fc.num_unmasked_kv_blocks(i, bq, bk, plan, False))
    assert whole[:n_whole] == [True] * n_whole and not any(whole[n_whole:])
    for j in range(n_k):
      if visible[j]:
        assert bool(fc.block_needs_mask(i, j, bq, bk, plan, False)) == (not whole[j])
  for j in range(n_k):
    visible = [bool(blocks(reach, i, j).any()) for i in range(n_q)]
    whole = [bool(blocks(mask, i, j).all()) for i in range(n_q)]
    first = int(fc.first_visible_q_block(j, bq, bk, plan))
    assert not any(visible[:first]) and all(visible[first:])
    first_whole = max(int(fc.first_unmasked_q_block(j, bq, bk, plan, False)), first)
    assert not any(whole[first:first_whole]) and all(whole[first_whole:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_does_not_copy_kv(backend):
  """Every kernel gets k and v with their K heads; the kv head is picked in the index map."""
  b, t, s, n, kh, h = 1, 16, 48, 8, 2, 64
  q, k = jnp.ones((b, t, n, h)), jnp.ones((b, s, kh, h))
  fn = functools.partial(flash_attention, interpret=True, backend=backend,
                         block_sizes=BlockSizes.uniform(16))
  jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](q))(q, k, k)
  calls = _pallas_calls(jaxpr.jaxpr)
  assert len(calls) == 3  # forward, dq, dk/dv
  for eqn in calls:
    shapes = [tuple(x.aval.shape) for x in eqn.invars]
    assert (b, s, kh, h) in shapes or (b, kh, s, h) in shapes, shapes
    assert (b, s, n, h) not in shapes and (b, n, s, h) not in shapes, shapes


def _pallas_calls(jaxpr):
  return find_eqns(jaxpr, ("pallas_call",), descend_into_found=False)


def test_cpu_default_is_the_reference():
  """On the CPU with interpret=None the reference runs (no Pallas call), bit for bit; inside
  `interpret_on_cpu()` (as the trainer traces) the kernel runs in the interpreter."""
  q, k, v = (_rand(i, (1, 8, 2, 64), jnp.float32) for i in range(3))
  assert jax.default_backend() == "cpu"
  assert not _pallas_calls(jax.make_jaxpr(flash_attention)(q, k, v).jaxpr)
  assert _pallas_calls(jax.make_jaxpr(functools.partial(flash_attention, interpret=True))(
      q, k, v).jaxpr)
  np.testing.assert_array_equal(flash_attention(q, k, v, causal=True),
                                reference_attention(q, k, v, causal=True))
  # The choice is made while tracing, so each trace below is of a new function (make_jaxpr,
  # like jit, reuses the trace of a function it has seen with these shapes).
  with fa.interpret_on_cpu():
    assert _pallas_calls(jax.make_jaxpr(lambda *a: flash_attention(*a))(q, k, v).jaxpr)
    # An explicit choice still wins.
    assert not _pallas_calls(jax.make_jaxpr(
        lambda *a: flash_attention(*a, backend="reference"))(q, k, v).jaxpr)
  # Scoped: outside it, the reference again.
  assert not _pallas_calls(jax.make_jaxpr(lambda *a: flash_attention(*a))(q, k, v).jaxpr)


def test_registered_as_model_attention(monkeypatch):
  """`TransformerConfig(attention=...)` reaches the kernel through the registry."""
  assert attention_ops.get_attention("flash") is fa.mesh_flash_attention
  kernel = functools.partial(fa.mesh_flash_attention, interpret=True, backend="gpu",
                             block_sizes=BlockSizes.uniform(16))
  monkeypatch.setitem(attention_ops._ATTENTION_FNS, "flash_interpret", kernel)
  cfg = dict(vocab_size=61, model_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
             num_decoder_layers=1, max_len=32)
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 1, 61)
  ref_model = lmjax.CausalLM(lmjax.TransformerConfig(**cfg))
  params = ref_model.init(jax.random.key(1), tokens)["params"]
  flash_model = lmjax.CausalLM(lmjax.TransformerConfig(**cfg, attention="flash_interpret"))
  want = ref_model.apply({"params": params}, tokens)
  got = jax.jit(flash_model.apply)({"params": params}, tokens)
  _assert_close(got, want, 1e-4, "logits")


def _shard_maps(jaxpr):
  return [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]


@pytest.mark.parametrize("n, kh, heads_split", [(4, 2, True), (4, 1, False)])
def test_mesh_flash_attention_splits_batch_and_heads(n, kh, heads_split):
  """Under a mesh, the kernel runs per device in a shard_map: the batch over (data, fsdp) and
  the heads over tensor when N and K both divide it (MQA's one kv head does not: heads whole).
  Values and gradients equal the reference's, with packed segments."""
  b, t, h = 4, 24, 64
  q = _rand(0, (b, t, n, h), jnp.float32)
  k, v = _rand(1, (b, t, kh, h), jnp.float32), _rand(2, (b, t, kh, h), jnp.float32)
  seg = _segments(3, b, t, 3)
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  kernel = functools.partial(fa.mesh_flash_attention, causal=True, segment_ids=seg,
                             interpret=True, backend="tpu", block_sizes=BlockSizes.uniform(16))
  ref = functools.partial(reference_attention, causal=True, segment_ids=seg)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(kernel)(q, k, v).jaxpr
    (maps,) = _shard_maps(jaxpr)
    want_spec = jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                           "tensor" if heads_split else None, None)
    assert maps.params["in_specs"][0] == want_spec
    assert _pallas_calls(maps.params["jaxpr"])
    got = jax.jit(kernel)(q, k, v)
    grads = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
  _assert_close(got, ref(q, k, v), FWD_TOL[jnp.float32], "out")
  want = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", grads, want):
    _assert_close(g, w, BWD_TOL[jnp.float32], f"d{name}")
  # No mesh, or a one-device mesh: the kernel itself, no shard_map.
  assert not _shard_maps(jax.make_jaxpr(kernel)(q, k, v).jaxpr)
  with jax.set_mesh(lmjax.make_mesh(data=1, devices=jax.devices()[:1])):
    assert not _shard_maps(jax.make_jaxpr(kernel)(q, k, v).jaxpr)


def _bad(**over):
  shapes = dict(q=(1, 8, 4, 64), k=(1, 8, 2, 64), v=(1, 8, 2, 64))
  dtypes = dict(q=jnp.float32, k=jnp.float32, v=jnp.float32)
  kw = dict(interpret=True, backend="tpu")
  for name in ("q", "k", "v"):
    shapes[name] = over.pop(name, shapes[name])
    dtypes[name] = over.pop(name + "_dtype", dtypes[name])
  kw.update(over)
  args = [jnp.ones(shapes[x], dtypes[x]) for x in ("q", "k", "v")]
  return args, kw


@pytest.mark.parametrize("over, match", [
    (dict(q=(8, 4, 64)), "rank 4"),
    (dict(v=(1, 9, 2, 64)), "k and v must have the same shape"),
    (dict(k=(2, 8, 2, 64), v=(2, 8, 2, 64)), "batch"),
    (dict(k=(1, 8, 2, 32), v=(1, 8, 2, 32)), "head dim"),
    (dict(k=(1, 8, 3, 64), v=(1, 8, 3, 64)), "multiple of kv heads"),
    (dict(q=(1, 8, 4, 12), k=(1, 8, 2, 12), v=(1, 8, 2, 12)), "head dim H=12"),
    (dict(q=(1, 8, 4, 512), k=(1, 8, 2, 512), v=(1, 8, 2, 512)), "head dim H=512"),
    (dict(q_dtype=jnp.int32, k_dtype=jnp.int32, v_dtype=jnp.int32), "dtype"),
    (dict(q_dtype=jnp.float16, k_dtype=jnp.float16, v_dtype=jnp.float16), "dtype"),
    (dict(k_dtype=jnp.bfloat16), "share a dtype"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids.q"),
    (dict(segment_ids=SegmentIds(jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8)))),
     "segment_ids.kv must be integers"),
    (dict(backend="cuda"), "backend"),
    (dict(interpret=False), "interpret=False"),
    (dict(interpret=pltpu.InterpretParams(), backend="gpu"), "TPU kernel"),
    (dict(backend="gpu", block_sizes=BlockSizes(block_q=24)), "block_sizes.block_q"),
    (dict(block_sizes=BlockSizes(block_k=0)), "block_sizes.block_k"),
    (dict(sm_scale=jnp.float32(0.5)), "sm_scale"),
])
def test_bad_inputs_raise(over, match):
  args, kw = _bad(**over)
  with pytest.raises(ValueError, match=match):
    flash_attention(*args, **kw)


def test_module_reexports_reference():
  from lmjax.attention_ops import reference_attention as original

  assert fa.reference_attention is original
