"""Building and registering lmjax's hand-written CPU kernels (XLA FFI custom calls).

Each kernel is one C++ file beside this module (`cpu_int4.cc`, `cpu_int8.cc`, `cpu_float.cc`,
sharing `cpu_kernels.h`), compiled on first use with the host's compiler (`$CXX`, else `g++`)
for the host's CPU (`-march=native`; `$LMJAX_CPU_MARCH` names another target, e.g. `haswell`
for the AVX2 code path or a cluster's oldest CPU) and registered with `jax.ffi`. The library
is kept in `lmjax.compilation_cache.cache_root() / "kernels"`, named by a hash of the sources, the
compiler and its flags, the jaxlib version and the CPU's flags; a build is made aside and
renamed, so a crashed or concurrent build never leaves a broken library. Kernels run only on
an x86-64 Linux host with AVX2 and FMA; `LMJAX_CPU_KERNELS=0` turns them off.
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
from pathlib import Path

import jax
import jaxlib

from lmjax.compilation_cache import cache_root

HERE = Path(__file__).parent
HEADER = HERE / "cpu_kernels.h"
ENV = "LMJAX_CPU_KERNELS"  # "0" / "off": every kernel off
MARCH_ENV = "LMJAX_CPU_MARCH"  # the compiler's -march (default "native")


def cpu_flags() -> str:
  """The CPU's feature flags (/proc/cpuinfo), "" where unknown."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def build(name: str) -> Path:
  """The compiled library of `<name>.cc`, compiling it first if no cached copy exists.

  Raises:
    RuntimeError: no compiler, or the compiler failed (its message attached).
  """
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    raise RuntimeError("no C++ compiler ($CXX, g++ or c++) on the PATH")
  source = HERE / f"{name}.cc"
  march = os.environ.get(MARCH_ENV, "").strip() or "native"
  flags = ["-O3", f"-march={march}", "-std=c++20", "-shared", "-fPIC", "-pthread",
           "-I", str(HERE), "-I", jax.ffi.include_dir()]
  key = hashlib.sha256(source.read_bytes() + HEADER.read_bytes() + " ".join(
      [cxx, *flags, jaxlib.__version__, cpu_flags()]).encode()).hexdigest()[:16]
  out = cache_root() / "kernels" / f"{name}-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed
    part = Path(tmp) / out.name
    done = subprocess.run([cxx, *flags, str(source), "-o", str(part)], capture_output=True,
                          text=True)
    if done.returncode:
      raise RuntimeError(f"{cxx} failed:\n{done.stderr[-2000:]}")
    os.replace(part, out)
  return out


def enabled() -> bool:
  """Whether kernels may run here: an x86-64 Linux host with AVX2 and FMA, not turned off by
  `$LMJAX_CPU_KERNELS=0`."""
  if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
    return False
  if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
    return False
  flags = cpu_flags().split()
  return "avx2" in flags and "fma" in flags


@functools.cache
def load(name: str, symbol: str, target: str) -> bool:
  """Builds `<name>.cc` (or finds it built) and registers its handler `symbol` as the CPU
  custom call `target`; False where kernels are not `enabled`, or (with a warning, once) the
  build failed."""
  if not enabled():
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(name)))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
    warnings.warn(f"lmjax's CPU kernel {name} is unavailable ({e}); its products use XLA's "
                  f"loop", RuntimeWarning, stacklevel=3)
    return False
  return True
