"""Two real processes (jax.distributed over 127.0.0.1, gloo CPU collectives, 2 fake devices each) train and
evaluate together through main.py; one process then restores their checkpoint and gets identical eval results."""

import os
import subprocess
import sys

from conftest import REPO, assert_same_eval, communicate_all, free_port, last_json, process_env, tiny_config
from resnext_jax import evaluate


def test_two_processes_train_and_evaluate(tmp_path, digits_dir, capsys):
  workdir = str(tmp_path / "wd")
  port = free_port()
  flags = ["--config=configs/digits_resnext.py:tiny", f"--config.data_dir={digits_dir}", "--config.image_size=16",
           "--config.num_train_steps=4", "--config.batch_size=32", "--config.eval_batch_size=64",
           "--config.checkpoint_every_steps=2", "--config.ema_decay=0.5", f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *flags, f"--process_id={i}"],
                            cwd=REPO, env=process_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  outputs = communicate_all(procs, timeout=400)
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
    assert "Process %d of 2; 2 local / 4 global devices." % procs.index(p) in err
  results = [last_json(out) for out, _ in outputs]
  assert results[0] == results[1]
  assert results[0]["step"] == 4 and results[0]["num_examples"] == 299 and "ema_top1" in results[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  # One process, one device: restores the two-process checkpoint and evaluates it to the same numbers.
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, image_size=16, eval_batch_size=64)
  assert_same_eval(evaluate.evaluate(config, workdir), results[0])
