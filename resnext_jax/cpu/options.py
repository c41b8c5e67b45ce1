"""XLA:CPU compiler options for the model's jitted steps, per executable (never process-wide).

XLA:CPU hands dots, reductions and (by default) convolutions to the YNNPACK library. For this model on CPU,
measured on the whole train step (docs/performance.md): YNNPACK's convolutions are slower than XLA's own
(Eigen) for the block-diagonal and stem convs, and letting YNNPACK fuse elementwise work into its dots
helps; dropping YNNPACK's reductions costs 2x. Same results to float32 rounding (tests/test_conv.py).

`timing_options()` adds one option for the small programs `cpu/autotune.py` compiles to time one layer's
candidates: XLA's older loop emitters instead of its MLIR fusion emitters. Those programs then compile with 43%
less CPU (the digits demo's 118 candidates: 41 -> 24 CPU-seconds, 25 -> 14 s on 2 cores), and what is timed
runs as fast as under the steps' options: the whole steps compiled both ways ran alike, interleaved in one
process (2-core AVX2 EPYC; digits train 436 vs 434 images/s, resnext50_32x4d batch 32 train 3.2 vs 3.1,
eval 11.9 vs 12.1). The steps themselves keep the fusion emitters: resnext50_32x4d's train step compiles in
7 s with them and 13-20 s without.

`run_once_options()` is for a program that runs once per job, the train state's initialiser: those emitters and
LLVM's optimisation level 0, since compiling it costs far more than running it. Measured on a 2-core AVX2 EPYC
(no persistent cache): resnext11_4x16d (the digits demo) compiles in 1.1-1.4 s instead of 2.4-2.7 (1.3-1.6
CPU-seconds instead of 4.0-4.2) and runs in 27 ms instead of 21; resnext50_32x4d at 224 compiles in 4.9 s
instead of 10.8 (5.6 CPU-seconds instead of 17.4) and runs in 1.9 s instead of 0.3. The weights are the same
draw: level 0 leaves some products unfused with their additions, so ~5% of the truncated-normal values
differ by 1-2 ulps (13 of the demo's 111 arrays); the same options always give the same bits.
"""

import functools
import os

from absl import logging
import jax
import numpy as np

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"}
_TIMING_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_RUN_ONCE_OPTIONS = {**_TIMING_OPTIONS, "xla_backend_optimization_level": 0}


def compiler_options(backend=None):
  """XLA options for jitting the model's steps on `backend` (default: JAX's): {} except on CPU.

  A choice the user made in XLA_FLAGS for the same option wins (per-executable options would override it);
  an option this jaxlib does not know (they are experimental) is left out.
  """
  return _usable(_CPU_OPTIONS, backend)


def timing_options(backend=None):
  """compiler_options() plus the faster-compiling emitters, for autotune's one-layer programs (see above)."""
  return {**compiler_options(backend), **_usable(_TIMING_OPTIONS, backend)}


def run_once_options(backend=None):
  """compiler_options() plus the cheapest code generation, for a program that runs once (see above)."""
  return {**compiler_options(backend), **_usable(_RUN_ONCE_OPTIONS, backend)}


def _usable(options, backend):
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return {}
  user_flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in options.items() if f"--{k}=" not in user_flags and _accepted(k, v)}


@functools.cache
def _accepted(name, value):
  """Whether this jaxlib's XLA:CPU accepts the option (one tiny compile per option, once per process)."""
  try:
    x = jax.device_put(np.zeros(2, np.float32), jax.local_devices(backend="cpu")[0])
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(x).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except  # XLA's error type differs across jaxlib versions
    logging.info("XLA:CPU does not accept %s=%s (%s); compiling without it", name, value, e)
    return False
