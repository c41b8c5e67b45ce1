"""Shared fixtures: tiny training configs, a prepared digits dataset, main.py in a subprocess, and the
launching of several processes that run together (jax.distributed over loopback).

Tests marked `slow` (beyond the CI budget) are deselected in CI with `-m "not slow"`.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

# XLA:CPU compiles dominate these tests; the same programs recur (a resumed run, eval after train, main.py in a
# subprocess), so share a persistent compilation cache for this session (inherited by subprocesses).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"

# 'auto' takes each layer's recorded default instead of timing it (resnext_jax/cpu/autotune.py): the suite's
# many small models would otherwise time every new layer shape, and runs compared for equality must choose
# alike. tests/test_autotune.py switches it back on.
os.environ.setdefault("RESNEXT_JAX_AUTOTUNE", "off")

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from resnext_jax.configs import default, digits_resnext  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: beyond the CI time budget; deselect with -m 'not slow'")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A ResNeXt with grouped convs (cardinality 4) small enough to compile and train in seconds on CPU."""
  c = default.get_config()
  c.model = "resnext11_4x16d"
  c.model_overrides = ml_collections.ConfigDict(digits_resnext.TINY_MODEL)
  c.dataset = "synthetic"
  c.synthetic_num_classes = 10
  c.synthetic_num_examples = 48
  c.image_size = 8
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 4
  c.learning_rate = 0.05
  c.lr_base_batch_size = 0
  c.lr_schedule = "cosine"
  c.warmup_steps = 1
  c.log_every_steps = 2
  c.eval_every_steps = -1
  c.eval_every_epochs = 0.0
  c.checkpoint_every_steps = 2
  c.shuffle_buffer_size = 256
  c.prefetch = 1
  c.rng_impl = "rbg"
  for key, value in overrides.items():
    c[key] = value
  return c


def digits_pipeline_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """The default config over the real sklearn_digits records at 32x32, batches of 64: the input pipeline tests'."""
  c = default.get_config()
  c.update(dataset="sklearn_digits", data_dir=data_dir, image_size=32, batch_size=64, eval_batch_size=64,
           shuffle_buffer_size=2048)
  c.update(overrides)
  return c


def data_mesh():
  """Every local device on the one 'data' axis, as runtime.make_mesh() in one process."""
  import jax  # pylint: disable=g-import-not-at-top (after the environment above is set)
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def take(iterator, n):
  """The next n batches of `iterator`, as numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def config_flags(config) -> list[str]:
  """Command-line overrides that turn configs/default.py into `config` (top-level fields only)."""
  base = default.get_config()
  flags = []
  for key, value in config.items():
    if key == "model_overrides" or value == base[key]:
      continue
    flags.append(f"--config.{key}={value}")
  return flags


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with sklearn_digits prepared once for the session."""
  from resnext_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_dataset_info(tiny_config(dataset="sklearn_digits", data_dir=path))
  return path


def process_env(devices: int, **extra) -> dict:
  """The environment of a test's subprocess: the CPU backend with `devices` fake devices, this repo importable."""
  return dict(os.environ, **extra, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def require_nvimgcodec():
  """nvidia.nvimgcodec (config.decode_on_device's decoder; its CPU backend runs that path here); the test skips
  without it, or fails where $RESNEXT_JAX_REQUIRE_NVIMGCODEC says it must be installed (CI)."""
  try:
    from nvidia import nvimgcodec  # pylint: disable=import-outside-toplevel
  except ImportError:
    if os.environ.get("RESNEXT_JAX_REQUIRE_NVIMGCODEC"):
      raise
    pytest.skip("nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13; .ci/run installs it)")
  return nvimgcodec


def run_main(args, *, devices=1, timeout=420, env=None):
  """Runs main.py in a fresh process with `devices` fake CPU devices; returns the CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                        env=process_env(devices, **(env or {})), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
  """A free TCP port on the loopback interface, for jax.distributed's coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def communicate_all(procs, timeout):
  """[(stdout, stderr)] of each of `procs`; any still running when this returns or raises (a timeout) is killed,
  so that a failed test leaves no process behind."""
  try:
    return [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def last_json(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.strip()]
  assert lines, "no stdout"
  return json.loads(lines[-1])


def assert_same_eval(a: dict, b: dict):
  """Counts (top-1, top-5, examples, step) identical; losses equal up to float32 rounding of the logits, which
  XLA may compute in a different order for a different per-device batch."""
  assert a.keys() == b.keys()
  for key in a:
    if key.endswith("loss"):
      assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    else:
      assert a[key] == b[key], (key, a[key], b[key])
