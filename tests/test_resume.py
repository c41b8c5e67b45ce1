"""A run resumed from its checkpoints ends bit for bit as an uninterrupted one, on a shuffled dataset whose
batches depend on the step the input pipeline restarts at (a synthetic run, one batch repeated, would not see
a wrong restart position)."""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import tiny_config
from resnext_jax import input_pipeline
from resnext_jax import train


def _digits(digits_dir, **overrides):
  """1,498 training digits // batch 256 = 5 steps per epoch: steps 0-4 are epoch 0, 5-9 epoch 1, 10 epoch 2. The
  whole split fits the shuffle buffer, so each epoch's order is a full permutation."""
  return tiny_config(dataset="sklearn_digits", data_dir=digits_dir, image_size=8, batch_size=256,
                     eval_batch_size=320, shuffle_buffer_size=2048, num_train_steps=11, warmup_steps=2,
                     checkpoint_every_steps=1000, keep_checkpoints=5, ema_decay=0.9, **overrides)


def _final_state(workdir):
  """The latest checkpoint's 'model' (params, BN statistics, EMA) and 'train' (step, optimizer state, RNG)
  items, read as saved (no restore target: nothing is reshaped or cast on the way)."""
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(name) for name in os.listdir(directory) if name.isdigit())
  checkpointer = ocp.StandardCheckpointer()
  return {item: jax.tree.map(np.asarray, checkpointer.restore(os.path.join(directory, str(step), item)))
          for item in ("model", "train")}


def _differs(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resumed_digits_run_ends_bit_identical(tmp_path, digits_dir, monkeypatch, capsys):
  straight, sliced, control = (str(tmp_path / name) for name in ("straight", "sliced", "control"))
  full = train.train_and_evaluate(_digits(digits_dir), straight)

  # Stopped one step into epoch 1: the restart shuffles epoch 1 as the straight run did and skips its first
  # batch, and the resumed run goes on across the boundary into epoch 2.
  assert train.train_and_evaluate(_digits(digits_dir, stop_after_steps=6), sliced) is None
  assert sorted(os.listdir(os.path.join(sliced, "checkpoints"))) == ["6"]
  shutil.copytree(sliced, control)
  assert train.train_and_evaluate(_digits(digits_dir), sliced) == full

  want, got = _final_state(straight), _final_state(sliced)
  assert int(want["train"]["step"]) == 11 and set(want["model"]) == {"params", "batch_stats", "ema_params",
                                                                       "ema_batch_stats"}
  assert jax.tree.structure(want) == jax.tree.structure(got)
  # Parameters, BN statistics, EMA, optimizer state (momentum), step and RNG: bit for bit.
  jax.tree.map(np.testing.assert_array_equal, want, got)

  # Control: the same resume from step 6 with the input pipeline restarted one step late must end elsewhere.
  create = input_pipeline.create_train_iterator
  monkeypatch.setattr(input_pipeline, "create_train_iterator",
                      lambda config, mesh, *, start_step=0: create(config, mesh, start_step=start_step + 1))
  train.train_and_evaluate(_digits(digits_dir), control)
  wrong = _final_state(control)
  assert int(wrong["train"]["step"]) == 11
  assert _differs(want["model"]["params"], wrong["model"]["params"])
  assert _differs(want["train"]["opt_state"], wrong["train"]["opt_state"])
  capsys.readouterr()
