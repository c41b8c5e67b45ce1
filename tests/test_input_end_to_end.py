"""TensorFlow out of the train step's path, the persistent compilation cache, and the end-to-end benchmark
(`python -m resnext_jax.benchmark --data`): each in a fresh process, as a user runs them."""

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

# Makes TensorFlow (and TFDS) look uninstalled: `import tensorflow` raises ModuleNotFoundError and
# importlib.util.find_spec says it is absent (a finder that raised instead would break libraries that probe for it,
# such as etils under JAX's compilation cache). Then imports the models, the train and eval steps and the input
# pipeline's JAX side, runs synthetic batches and the benchmark's synthetic mode (which jits and runs the step).
_NO_TENSORFLOW = textwrap.dedent("""
    import sys
    for name in ("tensorflow", "tensorflow_datasets"):
      sys.modules[name] = None
    import jax, numpy as np
    from resnext_jax import benchmark, evaluate, input_pipeline, models, train
    from resnext_jax.configs import default
    from resnext_jax.datasets import device_augment
    config = default.get_config()
    config.update(dataset="synthetic", image_size=8, batch_size=4, eval_batch_size=4, synthetic_num_examples=6,
                  synthetic_num_classes=3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch = next(input_pipeline.create_train_iterator(config, mesh))
    evals = list(input_pipeline.create_eval_iterator(config, mesh))
    assert batch["image"].shape == (4, 8, 8, 3) and len(evals) == 2
    assert device_augment.crop_resize_flip(np.zeros((1, 8, 8, 3), np.uint8), np.array([[0, 0, 8, 8]]),
                                           np.array([False]), size=4).shape == (1, 4, 4, 3)
    result = benchmark.main(["--model", "resnext11_4x16d", "--batch-size", "4", "--image-size", "16",
                             "--steps", "1", "--config", "cifar10_resnext29_8x64d"])
    assert sys.modules["tensorflow"] is None and sys.modules["tensorflow_datasets"] is None
    assert not [m for m in sys.modules if m.startswith(("tensorflow.", "tensorflow_datasets."))]
""")


def _env(cache_dir):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, RESNEXT_JAX_XLA_CACHE=str(cache_dir))
  return env


def _last_json(stdout):
  return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_train_step_and_synthetic_benchmark_without_tensorflow_and_cached_compiles(tmp_path):
  """Twice in fresh processes: no TensorFlow loaded, and the second process loads the train step from the
  persistent cache (config.compilation_cache_dir's default, here redirected by $RESNEXT_JAX_XLA_CACHE)."""
  runs = []
  for _ in range(2):
    result = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW], env=_env(tmp_path / "xla"), cwd=REPO,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs.append(_last_json(result.stdout))
  first, second = runs
  assert first["images_per_sec"] > 0 and first["compile_seconds"] > 0
  assert first["compilation_cache_hits"] == 0 and second["compilation_cache_hits"] >= 1
  assert os.listdir(tmp_path / "xla")
  assert second["compile_seconds"] < first["compile_seconds"]


def test_data_mode_times_input_step_and_loop(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "resnext_jax.benchmark", "--data", "--model", "resnext11_4x16d", "--batch-size", "4",
       "--image-size", "16", "--steps", "2", "--num-images", "12", "--input-batches", "2",
       "--data-dir", str(tmp_path / "jpegs"), "--config", "cifar10_resnext29_8x64d"],
      env=_env(tmp_path / "xla"), cwd=REPO, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  out = _last_json(result.stdout)
  for key in ("input_images_per_sec", "input_images_per_sec_per_core", "step_images_per_sec",
              "loop_images_per_sec", "loop_vs_step", "compile_seconds", "verdict"):
    assert key in out, key
  assert out["input_images_per_sec"] > 0 and out["loop_images_per_sec"] > 0
  assert abs(out["loop_vs_step"] - out["loop_images_per_sec"] / out["step_images_per_sec"]) < 0.01 * out["loop_vs_step"]
  assert out["data"]["num_files"] == 12
