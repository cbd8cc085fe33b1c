"""A hand-written CPU product for packed 4-bit weights: integer dot products, as llama.cpp's.

XLA's CPU code for `lmjax.quant.packed_int4`'s products widens each 4-bit code to float32
and multiplies it with its input in a vectorized loop: about as many weights per second as
the int8 loop (`packed_int4`'s docstring), so 4-bit weights decoded no faster than 8-bit
ones. This module builds `cpu_int4.cc` (beside it) with the host's C++ compiler on first use
and calls it as an XLA FFI custom call: each input row is rounded to int8 per weight group
(absmax / 127, round half to even; llama.cpp's Q8_1 activations beside its Q4_1 weights),
and each group's 4-bit codes meet those int8 inputs in the CPU's integer dot product
(AVX-512 VNNI / AVX-VNNI `vpdpbusd`, else AVX2 `vpmaddubsw`), 64 weights in a few
instructions, then the group's two scales in float32:

    y[m, n] = sum_g sx[m, g] * (scale[n, g] * sum_{k in g} xq[m, k] * code[n, k]
                                + offset[n, g] * sum_{k in g} xq[m, k])

The output rows are split between the calling thread and XLA's intra-op threads (at most
`$LMJAX_CPU_THREADS` of them when set), one share each. Used by `packed_int4.matmul_t` for
products of up to 16 rows (batch-1 decoding, speculative checks) of packed int4 params with
int8 activations (`lmjax.packed.pack(model, params, "int4", activations="int8")`) whose
groups are a multiple of 32 inputs (a GGUF's Q4_0 / Q4_1 blocks; packing's default 32).
The kernel is built only on an x86-64 Linux host with AVX2 and a C++20 compiler (`$CXX`,
else `g++`), and `LMJAX_CPU_KERNELS=0` turns it off; elsewhere (other platforms, group sizes,
no kernel) the same rounded inputs go through XLA's weight-only loop, so the numbers differ
only by float summation order (NaN inputs give NaN outputs on both paths). The compiled
library is kept in `lmjax.compilation_cache.cache_root() / "kernels"`, named by a hash of the
source, the compiler and its flags, the jaxlib version and the CPU's flags.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from lmjax.compilation_cache import cache_root

Array = jax.Array
SOURCE = Path(__file__).with_name("cpu_int4.cc")
TARGET = "lmjax_int4_matmul_t"
ENV = "LMJAX_CPU_KERNELS"
MAX_ROWS = 16  # input rows per call; more (a prompt) keep XLA's matmul


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def _build() -> Path:
  """The compiled library's path, compiling it first if no cached copy exists."""
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    raise RuntimeError("no C++ compiler ($CXX, g++ or c++) on the PATH")
  flags = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-pthread",
           "-I", jax.ffi.include_dir()]
  key = hashlib.sha256(SOURCE.read_bytes() + " ".join(
      [cxx, *flags, jaxlib.__version__, _cpu_flags()]).encode()).hexdigest()[:16]
  out = cache_root() / "kernels" / f"cpu_int4-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed
    part = Path(tmp) / out.name
    done = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(part)], capture_output=True,
                          text=True)
    if done.returncode:
      raise RuntimeError(f"{cxx} failed:\n{done.stderr[-2000:]}")
    os.replace(part, out)
  return out


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered (x86-64 with AVX2, a compiler, not turned off
  by `$LMJAX_CPU_KERNELS=0`); a failed build warns once and returns False."""
  if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
    return False
  if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
    return False
  if "avx2" not in _cpu_flags().split() or "fma" not in _cpu_flags().split():
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LmjaxInt4MatmulT),
                                platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    warnings.warn(f"lmjax's CPU int4 kernel is unavailable ({e}); packed int4 products use "
                  f"XLA's loop", RuntimeWarning, stacklevel=2)
    return False
  return True


def applies(x: Array, b: Array, scale: Array) -> bool:
  """Whether the kernel computes `matmul_t(x, b, scale, ...)`: a few rows, uint8 codes with
  float32 scales and offsets in groups of a multiple of 32 inputs lying within one nibble half,
  JAX's default backend the CPU, the kernel available (built here on first use)."""
  m, k = x.shape
  if scale.ndim != 3 or b.ndim != 2 or not k or not scale.shape[1]:
    return False
  n, g = scale.shape[0], scale.shape[1]
  gs = k // g
  return (m <= MAX_ROWS and scale.shape[-1] == 2 and b.shape == (n, k // 2) and k % 2 == 0
          and gs * g == k and gs % 32 == 0 and (k // 2) % gs == 0 and b.dtype == jnp.uint8
          and scale.dtype == jnp.float32 and jax.default_backend() == "cpu" and available())


def round_groups(x: Array, groups: int) -> Array:
  """float32 `x [M, K]` rounded to int8 per group of `K / groups` inputs (`x * (127 / absmax)`,
  half to even) and scaled back by `absmax / 127`: the inputs the kernel multiplies."""
  m, k = x.shape
  xg = x.astype(jnp.float32).reshape(m, groups, k // groups)
  amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
  codes = jnp.round(xg * jnp.where(amax > 0, 127.0 / amax, 0.0))  # the kernel's arithmetic
  return (codes * (amax / 127.0)).reshape(m, k)


def reference(x: Array, b: Array, scale: Array) -> Array:
  """What the kernel computes, in plain jnp: `round_groups(x)` times the dequantized weights
  (`packed_int4.dequantized`), float32."""
  from lmjax.quant.packed_int4 import dequantized
  return jnp.dot(round_groups(x, scale.shape[1]), dequantized(b, scale).T,
                 precision=jax.lax.Precision.HIGHEST)


def matmul_t(x: Array, b: Array, scale: Array, other: Callable[..., Array]) -> Array:
  """`round_groups(x [M, K]) @ dequantized(b [N, K/2], scale [N, G, 2]).T` -> float32 `[M, N]`:
  the compiled kernel on a CPU where it `applies`; elsewhere (other platforms, shapes, no
  kernel) the same rounded inputs through `other(x, b, scale)`, a weight-only product."""
  def rounded(x, b, scale):
    return other(round_groups(x, scale.shape[1]), b, scale)

  def cpu(x, b, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], b.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        x.astype(jnp.float32), b, scale)
  if not applies(x, b, scale):
    return rounded(x, b, scale)
  return jax.lax.platform_dependent(x, b, scale, cpu=cpu, default=rounded)
