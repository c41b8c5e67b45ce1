"""JAX's persistent compilation cache: the second run of a program (another process, a resumed job, the benchmark
again) loads the compiled executable from disk instead of compiling it again.

config.compilation_cache_dir picks the directory: "" (the default) means ~/.cache/resnext_jax/xla (or
$RESNEXT_JAX_XLA_CACHE), "none" (in either) turns the cache off. Entries are cached whatever their size, and
once they took config.compilation_cache_min_compile_secs (0.5 s) to compile, which keeps XLA:CPU's long
train-step compiles (tens of seconds) and skips the many millisecond ones. A directory set by
JAX_COMPILATION_CACHE_DIR (as the test suite does) is left as it is. `counts()` says how many compilations this
process served from the cache.
"""

import collections
import os

import jax
from absl import logging

ENV_DIR = "RESNEXT_JAX_XLA_CACHE"
_COUNTS = collections.Counter()
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_listening = False


def default_dir() -> str:
  return os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "resnext_jax", "xla")


def enable(directory: str | None = "", *, min_compile_secs: float = 0.5) -> str | None:
  """Turns the persistent cache on in `directory` ("" or None: default_dir(); "none", there or in
  $RESNEXT_JAX_XLA_CACHE: off); returns the directory in use, or None when off. Compilations after the call are
  cached."""
  _listen()
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # the environment's choice wins (e.g. the tests' shared cache)
  directory = directory or default_dir()
  if str(directory).lower() == "none":  # from the config or from $RESNEXT_JAX_XLA_CACHE
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    logging.warning("Compilation cache disabled: cannot create %s (%s).", directory, e)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size, and no filesystem override
  # JAX decides whether to use the cache at its first compilation; if one already ran (without a cache
  # directory), make it decide again at the next one.
  from jax.experimental.compilation_cache import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  jax_cache.reset_cache()
  return directory


def enable_from_config(config) -> str | None:
  return enable(config.get("compilation_cache_dir", ""),
                min_compile_secs=config.get("compilation_cache_min_compile_secs", 0.5))


def counts() -> dict:
  """{'hits': n, 'misses': m}: compilations this process looked up in the persistent cache."""
  return {"hits": _COUNTS["hits"], "misses": _COUNTS["misses"]}


def _listen() -> None:
  global _listening
  if _listening:
    return
  _listening = True

  def on_event(event, **kwargs):
    del kwargs
    if event in _EVENTS:
      _COUNTS[_EVENTS[event]] += 1

  jax.monitoring.register_event_listener(on_event)
