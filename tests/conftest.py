"""Test setup: 8 CPU devices (so mesh tests run on one machine), strict rank promotion, no
persistent compilation cache, LLVM optimization level 0 for XLA:CPU's code."""

import os

# Compiling is most of the suite's time (thousands of small programs, each run a few times):
# XLA:CPU's LLVM at -O0 compiles them about a third faster. XLA's own passes (fusion, layout,
# float normalization) are unchanged; set XLA_FLAGS=--xla_backend_optimization_level=N to differ.
FAST_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No test reads or writes the user's persistent compilation cache (tests that check the cache
# set their own folder): a test's result never depends on what earlier runs compiled.
os.environ.setdefault("LMJAX_COMPILATION_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
