"""JAX's persistent compilation cache, on by default for lmjax's command lines.

A second run of the same command loads its compiled executables from disk instead of compiling
them again. `enable()` points JAX's own cache (`jax_compilation_cache_dir`) at lmjax's cache
folder; `python -m infer` calls it, and a notebook or script can too, in one line before its
first jitted call:

    lmjax.compilation_cache.enable()

Where: `$LMJAX_COMPILATION_CACHE` when it is a path, else `cache_root() / "jax-compile"`
(`$XDG_CACHE_HOME/lmjax/jax-compile`, by default `~/.cache/lmjax/jax-compile`).
`LMJAX_COMPILATION_CACHE=0` (or off, false, no) turns it off (1, on, true, yes: the default
folder). Size: at most `max_bytes`
(`$LMJAX_COMPILATION_CACHE_MAX_BYTES`, default 2 GiB); past it JAX deletes the least recently
used executables. Every executable is kept, however fast it compiled
(`jax_persistent_cache_min_compile_time_secs=0`): a cold start is many small compiles besides
the large ones. The folder is created readable by its owner only: JAX runs what it loads from it,
so a cache folder others can write to lets them run code as you (JAX's warning).

What makes a hit: JAX keys an executable by its StableHLO (source locations left out), the
compile options, the devices, the XLA flags and the jax/jaxlib versions. lmjax's jitted
functions therefore take params, prompts and settings as arguments, never as closed-over
arrays (a constant baked into the HLO would give every run its own key).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "LMJAX_COMPILATION_CACHE"
ENV_MAX_BYTES = "LMJAX_COMPILATION_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 * 2**30
OFF = ("0", "off", "false", "no")
ON = ("1", "on", "true", "yes")  # the default folder

__all__ = ["ENV", "ENV_MAX_BYTES", "DEFAULT_MAX_BYTES", "OFF", "ON", "cache_root",
           "folder_from_env", "enable", "enable_for_command"]


def cache_root() -> Path:
  """lmjax's cache folder: `$XDG_CACHE_HOME/lmjax`, else `~/.cache/lmjax`."""
  base = os.environ.get("XDG_CACHE_HOME")
  return (Path(base) if base else Path.home() / ".cache") / "lmjax"


def folder_from_env(env: str, default: Path) -> Path | None:
  """The folder of an lmjax cache as environment variable `env` sets it: None when it turns
  the cache off (one of `OFF`), its path when it gives one, else (unset, empty, or one of
  `ON`) `default`."""
  value = os.environ.get(env, "").strip()
  if value.lower() in OFF:
    return None
  return default if not value or value.lower() in ON else Path(value).expanduser()


def _max_bytes(max_bytes: int | None) -> int:
  if max_bytes is None:
    text = os.environ.get(ENV_MAX_BYTES, "").strip()
    try:
      max_bytes = int(text) if text else DEFAULT_MAX_BYTES
    except ValueError:
      raise ValueError(f"${ENV_MAX_BYTES}={text!r} is not an integer number of bytes") from None
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
    raise ValueError(f"max_bytes={max_bytes!r} must be an int >= 1 (bytes)")
  return max_bytes


def enable(path: str | os.PathLike | None = None, max_bytes: int | None = None) -> Path | None:
  """Turns on JAX's persistent compilation cache (module docstring).

  Args:
    path: the cache folder (created). None: `$LMJAX_COMPILATION_CACHE` (a path, or 0 / off to
      leave the cache off), else `cache_root() / "jax-compile"`.
    max_bytes: the cache's size bound in bytes (None: `$LMJAX_COMPILATION_CACHE_MAX_BYTES`,
      else `DEFAULT_MAX_BYTES`).

  Returns:
    The folder in use, or None when the environment turned the cache off.

  Raises:
    ValueError: `max_bytes` (or its variable) is not a positive integer.
    OSError: the folder cannot be created.
  """
  limit = _max_bytes(max_bytes)
  folder = (folder_from_env(ENV, cache_root() / "jax-compile") if path is None
            else Path(path).expanduser())
  if folder is None:
    return None
  folder.mkdir(parents=True, exist_ok=True, mode=0o700)
  folder = folder.resolve()
  same = (jax.config.jax_compilation_cache_dir == str(folder)
          and jax.config.jax_compilation_cache_max_size == limit)
  if not same:
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()  # a cache JAX opened before takes the new settings
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", limit)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return folder


def enable_for_command(prog: str) -> Path | None:
  """`enable()` for a command line (`python -m infer`, the training jobs): a cache folder the
  user already gave JAX (`$JAX_COMPILATION_CACHE_DIR`) is kept; a cache that cannot be set up
  is a warning on stderr, never an error. Returns the folder in use, or None."""
  import sys

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  try:
    return enable()
  except (OSError, ValueError) as e:
    print(f"{prog}: warning: the compilation cache is off: {e}", file=sys.stderr)
    return None
