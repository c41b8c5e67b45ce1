"""Two real JAX processes (jax.distributed on CPU, 2 fake devices each) reading the digits together, and
decoding JPEGs on their devices (config.decode_on_device, nvImageCodec's CPU backend)."""

import subprocess
import sys
import textwrap

from conftest import communicate_all, free_port, process_env, require_nvimgcodec
from test_input_fast_decode import NINE_SIZES, write_image_folder
from test_input_pipeline import NUM_TEST, REPO, data_dir  # pylint: disable=unused-import (data_dir is a fixture)

_PROCESS = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[3]))
    from jax.sharding import Mesh
    from resnext_jax.configs import default
    from resnext_jax import input_pipeline
    config = default.get_config()
    config.update(dataset="sklearn_digits", data_dir=sys.argv[1], image_size=32, batch_size=32,
                  eval_batch_size=36, shuffle_buffer_size=2048)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert jax.process_count() == 2 and mesh.devices.size == 4
    local = lambda x: np.concatenate([np.asarray(s.data) for s in x.addressable_shards])
    batch = next(input_pipeline.create_train_iterator(config, mesh))
    assert batch["image"].shape == (32, 32, 32, 3) and local(batch["image"]).shape == (16, 32, 32, 3)
    batches = list(input_pipeline.create_eval_iterator(config, mesh))
    masked = [int(local(b["mask"]).sum()) for b in batches]
    print("RESULT", len(batches), sum(masked), flush=True)
""")


def test_two_processes(data_dir):
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, data_dir, str(port), str(i)], env=process_env(2),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = communicate_all(procs, timeout=300)
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = [line.split()[1:] for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT")]
  assert len(results) == 2
  assert results[0][0] == results[1][0] == str(-(-NUM_TEST // 36))  # same number of batches on both
  assert int(results[0][1]) + int(results[1][1]) == NUM_TEST  # every example once, across the processes


_DECODE_ON_DEVICE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[3]))
    from resnext_jax import input_pipeline, runtime
    from resnext_jax.configs import default
    from resnext_jax.datasets import normalization
    scale, _ = normalization.normalization(normalization.IMAGENET_MEAN, normalization.IMAGENET_STD)
    mesh = runtime.make_mesh()
    config = default.get_config()
    config.update(dataset="imagefolder", data_dir=sys.argv[1], eval_split="train", image_size=32, batch_size=8,
                  eval_batch_size=8, shuffle_buffer_size=16)
    local = lambda x: np.concatenate([np.asarray(s.data) for s in x.addressable_shards])
    batches = {}
    for on_device in (False, True):
      config.decode_on_device = on_device
      batches[on_device] = [next(input_pipeline.create_train_iterator(config, mesh, start_step=2)),
                            *input_pipeline.create_eval_iterator(config, mesh)]
    for host, device in zip(batches[False], batches[True]):
      assert (local(host["label"]) == local(device["label"])).all()
      diff = np.abs(local(host["image"]) - local(device["image"])) / scale  # grey levels
      print("DIFF", diff.mean(), np.percentile(diff, 99), flush=True)
""")


def test_two_processes_decode_on_device(tmp_path):
  """config.decode_on_device with two processes of two devices (nvImageCodec's CPU backend standing in for the
  GPU): each process decodes its own devices' slices, which give its part of the host path's batches."""
  require_nvimgcodec()
  write_image_folder(str(tmp_path), NINE_SIZES)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _DECODE_ON_DEVICE, str(tmp_path), str(port), str(i)],
                            env=process_env(2, RESNEXT_JAX_DECODE_BACKEND="cpu"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = communicate_all(procs, timeout=300)
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  diffs = [[float(v) for v in line.split()[1:]] for out, _ in outputs for line in out.splitlines()
           if line.startswith("DIFF")]
  assert len(diffs) == 6  # per process: a train batch, two eval batches
  assert all(mean < 2.0 and p99 < 16 for mean, p99 in diffs), diffs  # as the one-process comparison
