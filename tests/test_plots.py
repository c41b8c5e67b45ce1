"""Training curves from real TensorBoard event files written by clu's writer."""

import subprocess
import sys

import numpy as np
from clu import metric_writers
from PIL import Image

from resnext_jax import plots


def write_run(workdir, steps, offset=0.0):
  writer = metric_writers.create_default_writer(str(workdir), just_logging=False)
  for step in steps:
    writer.write_scalars(step, {"train_loss": 2.0 / step + offset, "learning_rate": 0.1 / step})
    if step % 2 == 0:
      writer.write_scalars(step, {"eval_loss": 1.5 / step, "eval_top1": 1 - 1 / step})
  writer.close()


def test_reads_every_scalar_and_later_writes_win(tmp_path):
  write_run(tmp_path, range(1, 7))
  write_run(tmp_path, range(5, 9), offset=10.0)  # a resumed run that repeats steps 5 and 6
  series = plots.read_scalars(str(tmp_path))
  assert set(series) == {"train_loss", "learning_rate", "eval_loss", "eval_top1"}
  steps, values = zip(*series["train_loss"])
  assert steps == tuple(range(1, 9))
  np.testing.assert_allclose(values[:4], [2.0 / s for s in range(1, 5)], rtol=1e-6)
  np.testing.assert_allclose(values[4:], [2.0 / s + 10.0 for s in range(5, 9)], rtol=1e-6)
  assert [s for s, _ in series["eval_top1"]] == [2, 4, 6, 8]


def test_cli_draws_a_png(tmp_path):
  write_run(tmp_path / "run", range(1, 11))
  out = tmp_path / "curves.png"
  result = subprocess.run([sys.executable, "-m", "resnext_jax.plots", "--workdir", str(tmp_path / "run"),
                           "--output", str(out)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  image = np.asarray(Image.open(out).convert("L"))
  assert image.shape[1] > 3 * image.shape[0] / 2  # three panels side by side
  assert (image < 128).mean() > 0.005  # something was drawn, not a blank canvas


def test_cli_says_when_there_is_nothing_to_plot(tmp_path):
  result = subprocess.run([sys.executable, "-m", "resnext_jax.plots", "--workdir", str(tmp_path)],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert "no TensorBoard scalars" in result.stderr and "Traceback" not in result.stderr
