"""Two real processes (jax.distributed over 127.0.0.1, gloo CPU collectives): what each process holds and reads,
not only what they print alike. Together they read every training example of an epoch exactly once (each its
half, through jax.process_index(), not an explicit index); a SIGTERM to one of them stops both at the same step
with one checkpoint (the preemption service's sync point); and at that step both hold bit-identical parameters,
BN statistics and optimizer state (nothing else compares replicated state across processes: a per-process seed
would go unnoticed)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
from jax.sharding import Mesh
import numpy as np

from conftest import REPO, communicate_all, free_port, process_env, tiny_config
from resnext_jax import input_pipeline

TESTS = os.path.dirname(os.path.abspath(__file__))
NUM_TRAIN = 1498  # = 2 x 7 x 107: batch 214 is 7 steps, 107 examples of each process's half of 749 per step
STEPS_PER_EPOCH = 7


def _config(digits_dir, **overrides):
  fields = dict(dataset="sklearn_digits", data_dir=digits_dir, image_size=8, batch_size=214, num_train_steps=100_000,
                shuffle_buffer_size=2048, checkpoint_every_steps=100_000, log_every_steps=100_000)
  return tiny_config(**{**fields, **overrides})


_PROCESS = """
import hashlib, json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
data_dir, port, process_id, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=2, process_id=process_id)
import numpy as np
sys.path.insert(0, {tests!r})
import test_multiprocess_state as here
from resnext_jax import checkpoint, input_pipeline, train

steps, epoch, saved = [0], [], []
create = input_pipeline.create_train_iterator

def recording_iterator(config, mesh, *, start_step=0):
  for batch in create(config, mesh, start_step=start_step):  # the batches the loop takes, as this process holds them
    steps[0] += 1
    if steps[0] <= here.STEPS_PER_EPOCH:
      epoch.extend(np.asarray(shard.data) for shard in batch["image"].addressable_shards)
      if steps[0] == here.STEPS_PER_EPOCH:
        np.save(os.path.join(workdir, f"epoch{{process_id}}.npy"), np.concatenate(epoch))
    with open(os.path.join(workdir, f"progress{{process_id}}"), "w") as f:
      f.write(str(steps[0]))
    yield batch

save = checkpoint.save

def recording_save(manager, step, *, model, meta, train=None, **kw):
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves((model, train)):  # this process's copy of the replicated state
    copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    assert all(np.array_equal(c, copies[0]) for c in copies)
    digest.update(copies[0].tobytes())
  saved.append((int(step), digest.hexdigest()))
  return save(manager, step, model=model, meta=meta, train=train, **kw)

input_pipeline.create_train_iterator = recording_iterator
checkpoint.save = recording_save
assert jax.process_count() == 2 and jax.device_count() == 2
result = train.train_and_evaluate(here._config(data_dir), workdir)
print("RESULT " + json.dumps({{"steps": steps[0], "saved": saved, "result": result}}), flush=True)
"""


def _epoch_images(digits_dir):
  """Every training example once, as the pipeline delivers it (one process, one device, the epoch as one batch)."""
  config = _config(digits_dir, batch_size=NUM_TRAIN)
  batch = next(input_pipeline.create_train_iterator(config, Mesh(np.array(jax.devices()[:1]), ("data",))))
  return np.asarray(batch["image"])


def _progress(path):
  """Steps a process has taken, as its recording iterator writes them (0 before the first)."""
  try:
    with open(path) as f:
      return int(f.read() or 0)
  except FileNotFoundError:
    return 0


def _sorted_rows(images):
  """Images as rows in lexicographic order: a multiset that equal images (to float rounding) give alike, since
  different pixel values stay far apart after normalisation."""
  rows = images.reshape(len(images), -1)
  return rows[np.lexsort(rows.T[::-1])]


def test_two_processes_read_the_epoch_once_stop_together_and_hold_the_same_state(tmp_path, digits_dir):
  port, workdir = free_port(), str(tmp_path / "wd")
  os.makedirs(workdir)
  code = _PROCESS.format(tests=TESTS)
  procs = [subprocess.Popen([sys.executable, "-c", code, digits_dir, str(port), str(i), workdir], cwd=REPO,
                            env=process_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    progress = [os.path.join(workdir, f"progress{i}") for i in range(2)]
    deadline = time.time() + 600  # start-up, compilation (and a first kernel build) on 2 shared cores
    while time.time() < deadline and all(p.poll() is None for p in procs):
      time.sleep(0.5)
      if all(_progress(f) > STEPS_PER_EPOCH for f in progress):
        break
    ended = [p.communicate()[1][-3000:] for p in procs if p.poll() is not None]
    assert not ended, f"a process ended before the signal: {ended}"
    assert all(_progress(f) > STEPS_PER_EPOCH for f in progress), "no epoch read within the deadline"
    procs[1].send_signal(signal.SIGTERM)  # process 0 gets no signal: it must learn of it from the service
    outputs = communicate_all(procs, timeout=240)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  runs = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
          for out, _ in outputs]

  # Both stopped at the same step, saved the one checkpoint there and printed no final evaluation.
  assert all(run["result"] is None for run in runs)
  assert len(runs[0]["saved"]) == 1 and [run["saved"][0][0] for run in runs] == [runs[0]["saved"][0][0]] * 2
  step = runs[0]["saved"][0][0]
  assert step > STEPS_PER_EPOCH and [run["steps"] for run in runs] == [step, step]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]
  # ... holding bit-identical parameters, BN statistics and optimizer state there.
  assert runs[0]["saved"][0][1] == runs[1]["saved"][0][1]

  # The first epoch: each process read 107 examples of its half per step, together every example exactly once.
  seen = [np.load(os.path.join(workdir, f"epoch{i}.npy")) for i in range(2)]
  assert [len(images) for images in seen] == [NUM_TRAIN // 2] * 2
  np.testing.assert_allclose(_sorted_rows(np.concatenate(seen)), _sorted_rows(_epoch_images(digits_dir)),
                             rtol=0, atol=1e-5)
