"""XLA:CPU compiler options for the model's jitted steps, per executable (never process-wide).

XLA:CPU hands dots, reductions and (by default) convolutions to the YNNPACK library. For this model on CPU,
measured on the whole train step (docs/performance.md): YNNPACK's convolutions are slower than XLA's own
(Eigen) for the block-diagonal and stem convs, and letting YNNPACK fuse elementwise work into its dots
helps; dropping YNNPACK's reductions costs 2x. Same results to float32 rounding (tests/test_conv.py).
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(backend=None):
  """XLA options for jitting the model's steps on `backend` (default: JAX's): {} except on CPU.

  A choice the user made in XLA_FLAGS for the same option wins (per-executable options would override it);
  a jaxlib that does not know the options (they are experimental) compiles without them.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu" or not _cpu_options_supported():
    return {}
  user_flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in _CPU_OPTIONS.items() if f"--{k}=" not in user_flags}


@functools.cache
def _cpu_options_supported():
  """Whether this jaxlib's XLA:CPU accepts `_CPU_OPTIONS` (one tiny compile, once per process)."""
  try:
    jax.jit(lambda x: x + 1, backend="cpu", compiler_options=_CPU_OPTIONS).lower(jnp.zeros(2)).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except  # XLA's error type differs across jaxlib versions
    logging.info("XLA:CPU does not accept %s (%s); compiling with its defaults", _CPU_OPTIONS, e)
    return False
