"""Building blocks: the shape alphabet, einsum projections, norms, and feed-forward layers.

Shape alphabet, used in every einsum string and docstring of the library:

  B batch          T query length      S key length        D model width
  N query heads    K kv heads          H head dim          F feed-forward width
  V vocab          L layers            G query heads per kv head (N // K)

Every parameter is created with logical axis names (`nn.with_logical_partitioning`); the
rules that map them onto mesh axes live in `lmjax.sharding`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import sharding
from lmjax.config import TransformerConfig

Array = jax.Array

# Initializers, as in GPT-2 / BERT: normal(0.02) for matrices, zeros for biases, ones for scales.
DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
  return jnp.dtype(name)


def einsum_f32(eqn: str, a: Array, b: Array) -> Array:
  """`jnp.einsum` with float32 accumulation and a float32 result, whatever the input dtype.

  Accelerators multiply bfloat16 inputs into float32 directly; XLA's CPU runtime lacks some of
  those mixed dots (e.g. "BF16 x BF16 = F32" in DotThunk), so on the CPU the inputs are upcast.
  """
  if jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(eqn, a, b, preferred_element_type=jnp.float32)


def project_split(eqn: str) -> int:
  """How many trailing dims of x a projection `eqn` contracts with w's leading dims, in order,
  with the output x's other dims then w's (e.g. 1 for "BTD,DNH->BTNH", 2 for "BTNH,NHD->BTD");
  0 when the equation is not of that form."""
  lhs, out = eqn.replace(" ", "").split("->")
  xs, ws = lhs.split(",")
  k = next((k for k in range(min(len(xs), len(ws)), 0, -1) if xs[len(xs) - k:] == ws[:k]), 0)
  return k if k and out == xs[:len(xs) - k] + ws[k:] else 0


def project(eqn: str, x: Array, w: Array) -> Array:
  """`jnp.einsum(eqn, x, w)` for a projection, as one 2-D matmul when the layout allows.

  When `project_split(eqn)` is k > 0, both sides are reshaped to matrices (XLA's CPU backend
  ran the 3-D form of a SwiGLU feed-forward 1.4x slower fwd+bwd). Other equations go to
  `jnp.einsum`, and so does every projection on a mesh with a `sequence` axis: merging a
  length split over devices into the rows of a matrix is not a split XLA can keep, so each
  device would compute (and keep for the backward) its rows at full length.
  """
  k = project_split(eqn)
  if k == 0 or sharding.sequence_shards() > 1:
    return jnp.einsum(eqn, x, w)
  lead, free = x.shape[:x.ndim - k], w.shape[k:]
  kdim = math.prod(w.shape[:k])
  y = jnp.dot(x.reshape(-1, kdim), w.reshape(kdim, -1))
  return y.reshape(lead + free)


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> Array:
  """Creates a parameter tagged with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names for shape {tuple(shape)}")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class Einsum(nn.Module):
  """A projection written as an einsum, e.g. `"BTD,DNH->BTNH"`, with an optional bias.

  Attributes:
    shape: the weight's shape.
    axes: the weight's logical axis names.
    eqn: the einsum from (input, weight) to output.
    bias_axes: when set, a bias over the output's trailing dims with these names.
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  eqn: str
  bias_axes: tuple[str | None, ...] | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  kernel_init: nn.initializers.Initializer = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = param(self, "kernel", self.kernel_init, self.shape, self.axes, dtype_of(self.param_dtype))
    dtype = dtype_of(self.dtype)
    y = project(self.eqn, x.astype(dtype), w.astype(dtype))
    if self.bias_axes is not None:
      bshape = y.shape[-len(self.bias_axes):]
      b = param(self, "bias", nn.initializers.zeros_init(), bshape, self.bias_axes,
                dtype_of(self.param_dtype))
      y = y + b.astype(dtype).reshape((1,) * (y.ndim - b.ndim) + b.shape)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: Array, scale: Array, bias: Array | None, rms: bool, eps: float) -> Array:
  """LayerNorm (Ba et al., 2016) or RMSNorm (Zhang & Sennrich, 2019) over the last axis.

  `(x - mean) / sqrt(var + eps) * scale + bias` (RMSNorm: no mean, no bias), all float32.
  The backward is written out (the standard two-reduction LayerNorm gradient from the saved
  normalized input) rather than left to autodiff: with autodiff's graph, XLA's CPU fusion
  recomputed the residual-stream gradient of every later layer inside each transposed copy
  feeding a weight gradient, which grew with depth and cost 15% of a GPT-2-small step
  (benchmarks/model_step.py).

  Args:
    x: `[..., D]` float32.
    scale: `[D]` float32.
    bias: `[D]` float32, or None.
    rms: RMSNorm when True, LayerNorm when False.
    eps: added to the variance.

  Returns:
    `[..., D]` float32.
  """
  return _normalize_fwd(x, scale, bias, rms, eps)[0]


def _normalize_fwd(x, scale, bias, rms, eps):
  xc = x if rms else x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  xhat = xc * rstd
  lead = (1,) * (x.ndim - 1)
  y = xhat * scale.reshape(lead + scale.shape)
  if bias is not None:
    y = y + bias.reshape(lead + bias.shape)
  return y, (xhat, rstd, scale, bias)


def _normalize_bwd(rms, eps, res, dy):
  del eps
  xhat, rstd, scale, bias = res
  g = dy * scale.reshape((1,) * (dy.ndim - 1) + scale.shape)
  dx = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
  if not rms:
    dx = dx - jnp.mean(g, axis=-1, keepdims=True)
  lead = tuple(range(dy.ndim - 1))
  dbias = None if bias is None else jnp.sum(dy, axis=lead)
  return dx * rstd, jnp.sum(dy * xhat, axis=lead), dbias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class Norm(nn.Module):
  """LayerNorm or RMSNorm (see `normalize`), statistics in float32, output in the compute dtype."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    pdt = dtype_of(cfg.param_dtype)
    d = x.shape[-1]
    scale = param(self, "scale", nn.initializers.ones_init(), (d,), ("norm",), pdt)
    bias = None
    if cfg.norm == "layernorm" and cfg.use_bias:
      bias = param(self, "bias", nn.initializers.zeros_init(), (d,), ("norm",), pdt)
      bias = bias.astype(jnp.float32)
    y = normalize(x.astype(jnp.float32), scale.astype(jnp.float32), bias,
                  cfg.norm == "rmsnorm", cfg.norm_eps)
    return y.astype(dtype_of(cfg.dtype))


def activation_fn(name: str):
  """The elementwise nonlinearity of an activation name (the gate's, for gated ones)."""
  return {
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "silu": jax.nn.silu,
      "swiglu": jax.nn.silu,
      "geglu": lambda x: jax.nn.gelu(x, approximate=True),
  }[name]


class FeedForward(nn.Module):
  """Position-wise feed-forward: `act(x W1) W2`, or gated `(act(x Wg) * x Wu) W2`.

  GLU variants (SwiGLU, GeGLU) follow Shazeer, 2020, "GLU Variants Improve Transformer".
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    cfg = self.config
    d, f = cfg.model_dim, cfg.ffn_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    bias = ("mlp",) if cfg.use_bias else None
    act = activation_fn(cfg.activation)
    if cfg.gated:
      gate = Einsum((d, f), ("embed", "mlp"), "BTD,DF->BTF", bias, name="wi_gate", **kw)(x)
      up = Einsum((d, f), ("embed", "mlp"), "BTD,DF->BTF", bias, name="wi_up", **kw)(x)
      h = act(gate) * up
    else:
      h = act(Einsum((d, f), ("embed", "mlp"), "BTD,DF->BTF", bias, name="wi", **kw)(x))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=not train)
    out_bias = ("embed",) if cfg.use_bias else None
    return Einsum((f, d), ("mlp", "embed"), "BTF,FD->BTD", out_bias, name="wo", **kw)(h)
