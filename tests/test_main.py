"""main.py as users run it: fresh processes, 8 (or 1) fake CPU devices, command-line config overrides."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_same_eval, last_json, run_main, tiny_config
from resnext_jax import evaluate

TINY = ["--config=configs/digits_resnext.py:tiny"]


def _no_traceback(proc):
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def test_digits_on_8_devices_then_eval_on_1_identical(tmp_path, digits_dir, capsys):
  workdir = str(tmp_path / "wd")
  flags = [*TINY, f"--config.data_dir={digits_dir}", "--config.num_train_steps=3", "--config.batch_size=32",
           "--config.eval_batch_size=64", "--config.checkpoint_every_steps=2", f"--workdir={workdir}"]
  trained = run_main(flags, devices=8)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "8 global devices" in trained.stderr
  result = last_json(trained.stdout)
  assert result["step"] == 3 and result["num_examples"] == 299
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]

  # Eval mode here, on one device: restores onto another device count, counts every example once again.
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, eval_batch_size=64)
  assert_same_eval(evaluate.evaluate(config, workdir), result)

  # Predict: one good image, one non-image; the good one is still predicted and the exit code says failure.
  image = str(tmp_path / "seven.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(image)
  bad = str(tmp_path / "bad.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8 truncated")
  predicted = run_main([*flags, "--mode=predict", f"--predict_files={image},{bad}"], devices=1)
  assert predicted.returncode == 1
  lines = predicted.stdout.strip().splitlines()
  assert len(lines) == 2 and '"top_k"' in lines[0] and '"error"' in lines[1]
  assert _no_traceback(predicted) == "error: 1 of 2 files could not be predicted"


def test_user_errors_are_one_line(tmp_path):
  """main.py prints user errors as one line, no traceback (the messages of the other kinds are tested in
  test_train; main.py handles them all alike)."""
  workdir = str(tmp_path / "wd")
  synthetic = [*TINY, "--config.dataset=synthetic", f"--workdir={workdir}"]
  indivisible = run_main([*synthetic, "--config.batch_size=12"], devices=8)
  assert "batch_size=12 must be divisible by the number of devices (8)" in _no_traceback(indivisible)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "wd")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "main.py"), *TINY, "--config.dataset=synthetic", f"--workdir={workdir}",
       "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000", "--config.log_every_steps=1"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  events = os.path.join(workdir, "checkpoints")
  while time.time() < deadline and proc.poll() is None:
    time.sleep(1)
    tfevents = [f for f in os.listdir(workdir) if f.startswith("events")] if os.path.isdir(workdir) else []
    if tfevents and os.path.getsize(os.path.join(workdir, tfevents[0])) > 2000:  # steps are being logged
      break
  assert proc.poll() is None, f"main.py ended before it was signalled:\n{proc.communicate()[1][-3000:]}"
  proc.send_signal(signal.SIGTERM)
  try:
    out, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:  # it ignored the signal: stop it, and say so rather than time out
    proc.kill()
    pytest.fail(f"main.py was still running 120 s after SIGTERM:\n{proc.communicate()[1][-3000:]}")
  assert proc.returncode == 0, err[-3000:]
  assert "Preemption signal: saved a checkpoint at step" in err
  steps = [int(s) for s in os.listdir(events) if s.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
  assert out.strip() == ""  # no final eval line: the run did not finish


@pytest.mark.slow
def test_digits_demo_reaches_97_percent(tmp_path, digits_dir):
  """The README's main command, as is (about 4 minutes on 2 CPU cores): >= 97% test top-1 from scratch."""
  start = time.time()
  proc = run_main(["--config=configs/digits_resnext.py", f"--config.data_dir={digits_dir}",
                   f"--workdir={tmp_path / 'wd'}"], timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = last_json(proc.stdout)
  assert result["num_examples"] == 299 and result["top1"] >= 0.97, result
  assert time.time() - start < 600
