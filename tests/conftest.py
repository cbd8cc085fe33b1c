"""Test setup: 8 CPU devices (so mesh tests run on one machine), strict rank promotion, no
persistent compilation cache."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No test reads or writes the user's persistent compilation cache (tests that check the cache
# set their own folder): a test's result never depends on what earlier runs compiled.
os.environ.setdefault("LMJAX_COMPILATION_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
